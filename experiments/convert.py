r"""Converts GPT-2 weights (hub name or local Hugging Face directory) to an orbax checkpoint.

  python -m experiments.convert --source=gpt2 --output=/tmp/gpt2_converted
  python -m experiments.train --config=experiments/configs/bit_xor.py --config.weights=/tmp/gpt2_converted ...
"""
from absl import app, flags, logging

from fpt_jax import weights
from fpt_jax.models import gpt2

_SOURCE = flags.DEFINE_string(
    "source", None, "Hub name (gpt2, gpt2-medium, gpt2-large, gpt2-xl, owner/name) or a local "
    "Hugging Face directory (config.json + model.safetensors / pytorch_model.bin / "
    "flax_model.msgpack).", required=True)
_OUTPUT = flags.DEFINE_string("output", None, "Directory to write the checkpoint to.",
                              required=True)


def main(argv):
    del argv
    config, params = weights.load_gpt2(_SOURCE.value)
    out = weights.save_converted(_OUTPUT.value, config, params)
    n = gpt2.num_params(config)
    logging.info("converted %s -> %s (%s parameters without the token embedding)",
                 _SOURCE.value, out, f"{n:,}")
    print(f"wrote {out}: {config}, {n:,} parameters (without wte)")


if __name__ == "__main__":
    app.run(main)
