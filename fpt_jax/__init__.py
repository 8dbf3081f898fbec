"""fpt-jax: the Frozen Pretrained Transformer (Lu et al., 2021) in pure JAX/Flax."""
