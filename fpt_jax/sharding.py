"""A (data, model) device mesh: the frozen backbone sharded over the model axis, for backbones
that one device cannot hold (`--config.mesh=(data,model)`; default None: data parallelism,
`parallel.py`'s pmap, unchanged).

Every step is one `jax.jit` program over the mesh, partitioned by XLA's GSPMD from the
shardings of its inputs: the frozen backbone sharded over `model` (`frozen_spec`: a
tensor-parallel layout, attention and MLP input projections split by their output units =
heads and hidden units, output projections by their input units; any other leaf by its last
dimension), batches split over `data`, the trainable parameters and optimizer state
replicated (FPT trains a small fraction of the parameters). A group of K runs (a sweep)
reads one copy of the sharded backbone, as on one device.

The loop sees the mesh as one logical device: arrays keep the leading device axis of the
pmap layout with size 1, so the loop, checkpoints and steps are the same code for both; the
step is vmapped over that axis under the same axis name (collectives over it reduce over
one member), and GSPMD does the cross-device reductions of the global batch.

Multi-process: the mesh spans every process's devices; the model axis stays inside a
process (its size divides the local device count) and each process feeds the rows of the
global batch that its devices hold (`jax.make_array_from_process_local_data`).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fpt_jax import parallel

AXES = ("data", "model")
# Output projections (their input units split: the product is reduced over the model axis).
ROW_PARALLEL = ("c_proj", "o_proj", "down_proj")
_BERT_ROW_PARALLEL = (("attention", "output", "dense"), ("output", "dense"))


def check_mesh(shape: Sequence[int], n_devices: int, local_devices: int,
               backbone: Any | None = None) -> None:
    """Raises ValueError naming `config.mesh` when (data, model) does not fit the devices,
    the processes or the backbone's heads and widths."""
    data, model = shape
    if data * model != n_devices:
        raise ValueError(f"config.mesh=({data}, {model}): data x model = {data * model} "
                         f"devices, but the run has {n_devices} (num_devices x processes); "
                         f"accepted: two integers whose product is {n_devices}")
    if local_devices % model:
        raise ValueError(f"config.mesh=({data}, {model}): the model axis must stay inside "
                         f"one process, whose {local_devices} devices it does not divide")
    if backbone is None or model == 1:
        return
    sizes = {"heads (n_head)": backbone.n_head, "width (n_embd)": backbone.n_embd,
             "MLP width": getattr(backbone, "mlp_width", backbone.n_embd)}
    if hasattr(backbone, "kv_heads"):
        sizes["key/value heads"] = backbone.kv_heads
    bad = [f"{name} {size}" for name, size in sizes.items() if size % model]
    if bad:
        raise ValueError(f"config.mesh=({data}, {model}): the model axis ({model}) does not "
                         f"divide the backbone's {', '.join(bad)}; accepted: a model axis "
                         "that divides them all")


def make_mesh(shape: Sequence[int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The (data, model) mesh over `devices` (default every device of every process), each
    process's devices contiguous, the model axis varying fastest (inside a process)."""
    devices = list(devices if devices is not None else jax.devices())
    devices.sort(key=lambda d: (d.process_index, d.id))
    return Mesh(np.array(devices).reshape(tuple(shape)), AXES)


def frozen_spec(path: Sequence[str], shape: Sequence[int], model: int) -> P:
    """The PartitionSpec of one frozen backbone leaf (without the leading device axis):
    2-D kernels `[in, out]` tensor-parallel (output projections by `in`, the others by
    `out`); any other leaf by its last dimension; a dimension that `model` does not divide
    is not split (the leaf is replicated)."""
    names = tuple(str(k) for k in path)
    spec: list[str | None] = [None] * len(shape)
    if not shape or model == 1:
        return P(*spec)
    axis = len(shape) - 1
    if len(shape) == 2 and names[-1] == "kernel":
        row = (names[-2] in ROW_PARALLEL
               or any(names[-1 - len(t):-1] == t for t in _BERT_ROW_PARALLEL))
        axis = 0 if row else 1
    if shape[axis] % model == 0:
        spec[axis] = "model"
    return P(*spec)


class Placement:
    """Where a group's arrays live and how its steps are compiled: data parallelism over
    devices (`mesh=None`: pmap, or jit over one device) or one (data, model) mesh."""

    def __init__(self, num_devices: int | None = None, mesh_shape: Sequence[int] | None = None,
                 backbone: Any | None = None):
        self.local = parallel.local_devices(num_devices)
        if mesh_shape is None:
            self.mesh = None
            self.mapped = parallel.pmap_devices(num_devices)
            return
        everywhere = parallel.pmap_devices(num_devices)
        check_mesh(mesh_shape, len(everywhere), len(self.local), backbone)
        self.mesh = make_mesh(mesh_shape, everywhere)
        self.mapped = everywhere

    @property
    def slots(self) -> int:
        """The leading (device) axis of every array: the local devices, or 1 (the mesh)."""
        return 1 if self.mesh is not None else len(self.local)

    @property
    def data_parallel(self) -> int:
        """In how many parts a global batch is split."""
        return (self.mesh.shape["data"] if self.mesh is not None
                else len(self.local) * jax.process_count())

    def per_process_batch(self, global_batch: int, grad_accum: int = 1,
                          name: str = "batch_size") -> int:
        """This process's rows of a global batch; errors name the setting."""
        if self.mesh is None:
            per_device = parallel.per_device_batch(global_batch, grad_accum, len(self.local),
                                                   name)
            return per_device * grad_accum * len(self.local)
        parts = self.data_parallel * grad_accum
        if global_batch < 1 or global_batch % parts:
            raise ValueError(f"{name}={global_batch} is not divisible by the mesh's data axis "
                             f"x grad_accum = {self.data_parallel} x {grad_accum}; accepted: "
                             f"a multiple of {parts}")
        return global_batch // jax.process_count()

    def _sharding(self, spec: P) -> NamedSharding:
        return NamedSharding(self.mesh, spec)

    def map(self, fn: Callable, in_axes: Any = 0, donate_argnums: tuple[int, ...] = ()
            ) -> Callable:
        """`fn` over the leading device axis: `parallel.map_over_devices`, or on the mesh one
        jit program (the axis of size 1 vmapped), its outputs replicated."""
        if self.mesh is None:
            return parallel.map_over_devices(fn, self.mapped, in_axes, donate_argnums)

        def logical(*args):
            axes = in_axes if isinstance(in_axes, (tuple, list)) else (in_axes,) * len(args)
            args = [a if ax is None else jax.tree_util.tree_map(lambda x: x[0], a)
                    for a, ax in zip(args, axes)]
            out = jax.vmap(fn, in_axes=None, axis_size=1, axis_name=parallel.AXIS)(*args)
            return out
        return jax.jit(logical, donate_argnums=donate_argnums,
                       out_shardings=self._sharding(P()))

    def _put(self, x: Any, spec: P) -> jax.Array:
        x = np.asarray(x)
        sharding = self._sharding(spec)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    def replicate(self, tree: Any) -> Any:
        """Every leaf with the leading device axis, a copy on every device."""
        if self.mesh is None:
            return parallel.replicate(tree, self.local)
        return jax.tree_util.tree_map(lambda x: self._put(np.asarray(x)[None], P()), tree)

    def shared(self, tree: Any) -> Any:
        """Leaves without a device axis that every device reads (the runs' keys)."""
        if self.mesh is None:
            return tree
        return jax.tree_util.tree_map(lambda x: self._put(x, P()), tree)

    def put_frozen(self, frozen: dict, backbone_key: str = "transformer") -> Any:
        """The frozen tree: the backbone sharded over the model axis (`frozen_spec`), any
        other frozen part (per run) replicated."""
        if self.mesh is None:
            return parallel.replicate(frozen, self.local)
        model = self.mesh.shape["model"]

        def put(path, x):
            keys = [str(getattr(k, "key", k)) for k in path]
            x = np.asarray(x)[None]
            if keys[0] != backbone_key:
                return self._put(x, P())
            return self._put(x, P(None, *frozen_spec(keys[1:], x.shape[1:], model)))
        return jax.tree_util.tree_map_with_path(put, frozen)

    def put_batch(self, batch: dict[str, np.ndarray], rows_axis: int) -> Any:
        """A batch in the device layout (`[slots, ...]`) onto the devices: as it is for
        pmap; on the mesh, split over the data axis at `rows_axis` (this process's rows)."""
        if self.mesh is None:
            return batch

        def put(x):
            spec = [None] * x.ndim
            spec[rows_axis] = "data"
            return jax.make_array_from_process_local_data(self._sharding(P(*spec)), x)
        return {k: put(v) for k, v in batch.items()}


def bytes_per_device(tree: Any) -> dict[jax.Device, int]:
    """The bytes each device holds of `tree`'s arrays (its addressable shards)."""
    held: dict[jax.Device, int] = {}
    for leaf in jax.tree_util.tree_leaves(tree):
        for shard in leaf.addressable_shards:
            held[shard.device] = held.get(shard.device, 0) + shard.data.nbytes
    return held
