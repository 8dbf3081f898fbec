"""The peak FLOP/s that utilisation is measured against, and XLA's matmuls next to PyTorch's.

On CPU the peak is the best of a few large matmuls of the step's dtype timed in the same
process (pmapped over the step's devices), one peak per dtype benchmarked; on GPU/TPU a table
of published peaks; or the `peak_tflops` setting. Matmuls are timed as the training step runs
them (`matmul`): float32 in float32; bfloat16 operands accumulating in (and returning)
float32. `matmul_comparison` times XLA's and PyTorch's matmuls on the backbone's own weight
shapes, one device each, size by size.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fpt_jax import parallel
from fpt_jax.bench.core import Bench, timed

# Published dense peak TFLOP/s per JAX device (substring of `device_kind`, lower case) for
# the matmul unit a dtype uses by default: fp32 matmuls run as TF32 on Ampere/Hopper GPUs and
# as bf16 passes on TPUs. Sources: NVIDIA data sheets; Google Cloud TPU system architecture
# pages (per chip; v2/v3 expose one JAX device per core = half a chip). Override with
# peak_tflops when your part differs (clocks, PCIe vs SXM).
PUBLISHED_PEAK_TFLOPS = {
    "h100": {"float32": 494.7, "bfloat16": 989.4},
    "a100": {"float32": 156.0, "bfloat16": 312.0},
    "l4": {"float32": 60.0, "bfloat16": 121.0},
    "a10": {"float32": 62.5, "bfloat16": 125.0},
    "v100": {"float32": 15.7, "bfloat16": 15.7},  # no bf16 tensor cores
    "t4": {"float32": 8.1, "bfloat16": 8.1},  # no bf16 tensor cores
    "tpu v2": {"float32": 22.5, "bfloat16": 22.5},
    "tpu v3": {"float32": 61.5, "bfloat16": 61.5},
    "tpu v4": {"float32": 275.0, "bfloat16": 275.0},
    "tpu v5 lite": {"float32": 197.0, "bfloat16": 197.0},
    "tpu v5e": {"float32": 197.0, "bfloat16": 197.0},
    "tpu v5p": {"float32": 459.0, "bfloat16": 459.0},
    "tpu v5": {"float32": 459.0, "bfloat16": 459.0},
    "tpu v6": {"float32": 918.0, "bfloat16": 918.0},
}

PEAK_MATMULS = ((2048, 768, 3072), (2048, 3072, 768), (2048, 2048, 2048))


def published_peak(device_kind: str, dtype: str) -> float | None:
    kind = device_kind.lower()
    for key, peaks in PUBLISHED_PEAK_TFLOPS.items():
        if key in kind:
            return peaks.get(dtype)
    return None


def _best_tflops(call: Callable[[], Any], flops: float, repeats: int) -> float:
    """`flops` over the fastest of `repeats` timed calls of `call`, after one untimed call."""
    call()
    return flops / min(timed(call) for _ in range(repeats)) / 1e12


def accumulation_dtype(dtype: str) -> str:
    """The dtype the step's matmuls of `dtype` operands accumulate in and return: float32
    for both. bfloat16 operands accumulate in float32 (`preferred_element_type`), as every
    bfloat16 matmul of the training step does; a bfloat16 output takes a slow path on XLA:CPU
    (512x768 @ 768x3072 on a Zen 5: 420 GFLOP/s, against 975 with a float32 output and 487
    in float32), so a peak of bfloat16 outputs would understate what the step can reach."""
    return "float32"


def matmul(dtype: str) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """`(a, b) -> a @ b` as the step computes it under `dtype`: operands of `dtype`,
    accumulated in and returned as `accumulation_dtype(dtype)`."""
    acc = jnp.dtype(accumulation_dtype(dtype))
    return lambda a, b: jnp.dot(a, b, preferred_element_type=acc)


def measure_matmul_peak(devices: Sequence[jax.Device], dtype: str, repeats: int = 10,
                        sizes: Sequence[tuple[int, int, int]] = PEAK_MATMULS
                        ) -> dict[str, Any]:
    """Best FLOP/s of `[m, k] @ [k, n]` matmuls of `dtype` operands (`matmul`: bfloat16
    accumulates in float32), one per device at once (pmap over `devices`, as the step runs),
    in total over the devices."""
    jdtype = jnp.dtype(dtype)
    mm = jax.pmap(matmul(dtype), devices=devices)
    rng = np.random.default_rng(0)
    per_size = []
    for m, k, n in sizes:
        a, b = (parallel.replicate(jnp.asarray(rng.standard_normal(s, np.float32), jdtype),
                                   devices) for s in ((m, k), (k, n)))
        tflops = _best_tflops(lambda: jax.block_until_ready(mm(a, b)),
                              2 * m * k * n * len(devices), repeats)
        per_size.append({"m": m, "k": k, "n": n, "tflops": tflops})
    return {"tflops": max(r["tflops"] for r in per_size), "source": "measured",
            "devices": len(devices), "operands": dtype,
            "accumulation": accumulation_dtype(dtype), "matmuls": per_size}


def measure_torch_matmul(dtype: str, size: tuple[int, int, int], threads: int | None,
                         repeats: int = 10, device: str = "cpu") -> float:
    """TFLOP/s of PyTorch's `[m, k] @ [k, n]` of `dtype` on one device with `threads`."""
    import torch
    if threads:
        torch.set_num_threads(threads)
    m, k, n = size
    tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(m, k, generator=gen).to(device=device, dtype=tdtype)
    b = torch.randn(k, n, generator=gen).to(device=device, dtype=tdtype)
    with torch.inference_mode():
        return _best_tflops(lambda: (a @ b, sync()), 2 * m * k * n, repeats)


def backbone_matmuls(width: int, rows: Sequence[int]) -> list[tuple[int, int, int]]:
    """The backbone's MLP weight matmuls (`[rows, width] @ [width, 4 width]` and back) at
    the given row counts (batch x tokens)."""
    return [(m, k, n) for m in rows for k, n in ((width, 4 * width), (4 * width, width))]


def matmul_comparison(devices: Sequence[jax.Device], dtype: str, threads: int | None,
                      sizes: Sequence[tuple[int, int, int]], torch_device: str = "cpu"
                      ) -> dict[str, Any]:
    """XLA's and PyTorch's matmul rates on the given shapes, one device each, measured in
    this process (A B per size, so that drift cancels). XLA's are the step's (`matmul`:
    bfloat16 operands accumulate in float32); PyTorch's `a @ b` returns `dtype`."""
    rows = []
    for m, k, n in sizes:
        xla = measure_matmul_peak(devices[:1], dtype, sizes=((m, k, n),))["tflops"]
        ref = measure_torch_matmul(dtype, (m, k, n), threads, device=torch_device)
        rows.append({"m": m, "k": k, "n": n, "xla_tflops": xla, "torch_tflops": ref,
                     "ratio": xla / ref})
    return {"dtype": dtype, "xla_accumulation": accumulation_dtype(dtype), "threads": threads,
            "sizes": rows}


def peak_for(bc: Bench, devices: Sequence[jax.Device], dtype: str
             ) -> dict[str, Any] | None:
    """The peak, in total over `devices` and every process, that utilisation is computed
    against; None when unknown."""
    n_glob = len(devices) * jax.process_count()
    if bc.settings.peak_tflops:
        return {"tflops": bc.settings.peak_tflops * n_glob,
                "source": "peak_tflops (per device)",
                "devices": n_glob}
    if devices[0].platform == "cpu":
        peak = measure_matmul_peak(devices, dtype)
        peak["tflops"] *= jax.process_count()
        peak["devices"] = n_glob
        return peak
    per = published_peak(devices[0].device_kind, dtype)
    return None if per is None else {"tflops": per * n_glob, "devices": n_glob,
                                     "source": f"published ({devices[0].device_kind})"}
