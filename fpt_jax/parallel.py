"""Data parallelism: the pmap axis, per-device batches, replication, multi-host setup."""
from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np
from flax import jax_utils

AXIS = "batch"  # the pmap axis name that gradients and metrics are averaged over


def local_devices(num_devices: int | None = None) -> list[jax.Device]:
    devices = jax.local_devices()
    if num_devices is None:
        return devices
    if not 1 <= num_devices <= len(devices):
        raise ValueError(f"num_devices={num_devices} but this process has {len(devices)} "
                         "local devices")
    return devices[:num_devices]


def per_device_batch(global_batch: int, grad_accum: int = 1,
                     num_local_devices: int | None = None) -> int:
    """The batch each device sees in one micro-step; errors name what does not divide."""
    n_dev = (num_local_devices or jax.local_device_count()) * jax.process_count()
    if global_batch < 1 or grad_accum < 1:
        raise ValueError(f"batch_size ({global_batch}) and grad_accum ({grad_accum}) must be >= 1")
    if global_batch % (n_dev * grad_accum):
        raise ValueError(
            f"batch_size={global_batch} is not divisible by devices x grad_accum = "
            f"{n_dev} x {grad_accum} = {n_dev * grad_accum}; accepted: a multiple of "
            f"{n_dev * grad_accum}")
    return global_batch // (n_dev * grad_accum)


def shard_batch(batch: dict[str, np.ndarray], num_devices: int, grad_accum: int = 1
                ) -> dict[str, np.ndarray]:
    """`[process_batch, ...]` -> `[devices, (grad_accum,) micro_batch, ...]` (a view)."""
    def reshape(x):
        if x.shape[0] % (num_devices * grad_accum):
            raise ValueError(f"batch of {x.shape[0]} does not split over {num_devices} devices "
                             f"x {grad_accum} accumulation steps")
        lead = (num_devices, grad_accum) if grad_accum > 1 else (num_devices,)
        return x.reshape(*lead, -1, *x.shape[1:])
    return {k: reshape(v) for k, v in batch.items()}


def replicate(tree: Any, devices: Sequence[jax.Device]) -> Any:
    return jax_utils.replicate(tree, devices)


def unreplicate(tree: Any) -> Any:
    """The first replica of every leaf, on the host as numpy."""
    return jax.tree_util.tree_map(lambda x: np.asarray(jax.device_get(x[0])), tree)
