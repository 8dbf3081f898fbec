"""The suite: every case of every shape, with the PyTorch reference, interleaved.

The baselines' cases (`BenchConfig.baselines`) are interleaved with the base model's; the
PyTorch reference is GPT-2's recipe, so it runs for the base model's cases only.
All runners of one shape are compiled and warmed up, then timed round by round (A B C A B C
...) so that drift of the machine's speed cancels out of the ratios. The report is a dict
(`report.write` turns it into JSON, markdown and a plot).
"""
from __future__ import annotations

import dataclasses
import datetime
import gc
import os
import platform
import shlex
import subprocess
from typing import Any, Callable, Sequence

import jax

from fpt_jax import parallel
from fpt_jax.bench import peaks
from fpt_jax.bench.core import Bench, Case, Runner, mode_of
from fpt_jax.bench.jax_step import JaxRunner, dtype_loss_check, fits_on_host
from fpt_jax.bench.torch_ref import TorchRunner, torch_available, torch_device_for, unsupported
from fpt_jax.models import backbones

# Environment variables that change speed (allocator, threads, XLA), recorded with results.
PERF_ENV = ("XLA_FLAGS", "GLIBC_TUNABLES", "LD_PRELOAD", "MALLOC_ARENA_MAX", "OMP_NUM_THREADS",
            "OMP_WAIT_POLICY", "MKL_NUM_THREADS", "JAX_PLATFORMS", "TF_CPP_MIN_LOG_LEVEL")


def interleave(runners: Sequence[Runner], steps: int, rounds: int, switch_steps: int = 1,
               log: Callable[[str], None] | None = None) -> None:
    """Times `steps` steps of every runner, split into `rounds` rounds of A B C ... . Each
    turn starts with `switch_steps` untimed steps, which absorb what the previous runner
    leaves behind (its threads spinning down, caches holding its weights)."""
    for r in range(rounds):
        for runner in runners:
            for _ in range(switch_steps if len(runners) > 1 else 0):
                runner.run_step()
            for _ in range(steps // rounds + (r < steps % rounds)):
                runner.step()
        if log:
            log(f"  round {r + 1}/{rounds} done")


def run(bc: Bench, command: str = "", log: Callable[[str], None] | None = print
        ) -> dict[str, Any]:
    """Measures every case of `bc`, shape by shape, with the PyTorch reference of every
    (selection, dtype) interleaved; returns the report."""
    log = log or (lambda _: None)
    bc.validate()
    s = bc.settings
    devices = parallel.local_devices(bc.base.num_devices)
    bc.check_shapes(len(devices) * jax.process_count())  # before anything is timed
    env = environment(devices)
    why_not = unsupported(bc)
    torch_device = (torch_device_for(env["backend"])
                    if s.torch_reference and not why_not and not s.compile_only else None)
    if torch_device == "cpu" and s.torch_threads is None:
        s = dataclasses.replace(s, torch_threads=os.cpu_count())
        bc = dataclasses.replace(bc, settings=s)
    backbone = bc.backbone()
    report: dict[str, Any] = {
        "command": command, "started": _now(), "environment": env,
        "config": bc.to_dict(),
        "model": {"family": backbones.family_of(backbone).name,
                  **{k: getattr(backbone, k) for k in ("n_layer", "n_head", "n_embd")}},
        "baselines": {m: {"family": backbones.family_of(b).name,
                          **{k: getattr(b, k) for k in ("n_layer", "n_head", "n_embd")}}
                      for m in bc.baselines for b in [bc.backbone(m)]},
        "torch_reference": torch_device, "peaks": {}, "results": [], "checks": {},
        "scaling_shapes": [s.name for s in bc.shapes if s.name.startswith("seq")],
    }
    if s.torch_reference and not torch_device and not s.compile_only:
        report["torch_reference_note"] = "not run: " + (
            why_not or ("torch/transformers missing" if not torch_available()
                        else f"no torch device next to {env['backend']}"))
    # One peak per dtype benchmarked (bfloat16: bfloat16 operands, float32 accumulation, as
    # the step's matmuls); each case's utilisation is against its own dtype's peak.
    for dtype in () if s.compile_only else bc.dtypes:
        report["peaks"][dtype] = peak = peaks.peak_for(bc, devices, dtype)
        if peak:
            log(f"peak {dtype}: {peak['tflops']:.3f} TFLOP/s ({peak['source']})")
    if torch_device:
        # the rows of the step's matmuls: a shape's tokens, times K for a sweep of K runs
        sizes = peaks.backbone_matmuls(backbone.n_embd, sorted(
            {s.tokens * k for s in bc.shapes for k in bc.sweeps}))
        for dtype in bc.dtypes:
            cmp = peaks.matmul_comparison(devices, dtype, s.torch_threads, sizes, torch_device)
            report.setdefault("matmul_comparison", []).append(cmp)
            for row in cmp["sizes"]:
                log(f"matmul {dtype} {row['m']}x{row['k']}@{row['k']}x{row['n']}: XLA "
                    f"{row['xla_tflops'] * 1e3:.0f}, PyTorch {row['torch_tflops'] * 1e3:.0f} "
                    f"GFLOP/s ({row['ratio']:.2f}x)")
    for shape in bc.shapes:
        log(f"shape {shape.name}: batch {shape.batch_size} x {shape.seq_len} tokens x "
            f"{shape.features} features -> {shape.classes} classes")
        runners, not_run = [], []
        batches = [shape.task().batch("train", i, shape.batch_size, seed=bc.base.seed)
                   for i in range(2)] if torch_device else []
        cases = bc.cases(shape)
        for i, case in enumerate(cases):
            r = JaxRunner(bc, case, devices)
            log(f"  compiling {case.label}")
            r.compile()
            log(f"  compiled in {r.compile_s:.1f} s")
            fits, why = (fits_on_host(r.memory, len(devices), s.memory_fraction)
                         if devices[0].platform == "cpu" else (True, ""))
            if s.compile_only or not fits:
                r.skipped = "compile only" if s.compile_only else why
                log(f"  {r.skipped}")
                r.release()
                not_run.append(r)
                gc.collect()
            else:
                r.warm_up(s.warmup)
                runners.append(r)
            nxt = cases[i + 1] if i + 1 < len(cases) else None
            if torch_device and case.model is None and (
                    nxt is None or (nxt.model, nxt.trainable, nxt.dtype)
                    != (case.model, case.trainable, case.dtype)):
                # the reference (it has no remat) after its (selection, dtype)'s last case;
                # GPT-2's recipe, so none for a baseline's cases
                r = TorchRunner(bc, Case(shape, case.trainable, case.dtype), batches,
                                torch_device)
                log(f"  torch {r.case.label}: warming up")
                r.warm_up(s.warmup)
                runners.append(r)
        if runners:
            log(f"  timing {s.steps} steps of {len(runners)} runners in {s.rounds} rounds")
            interleave(runners, s.steps, s.rounds, s.switch_steps, log)
        for r in [*not_run, *runners]:
            res = r.result()
            report["results"].append(res)
            if res["step_ms"]:
                log(f"  {r.framework:5s} {r.case.label:32s} {res['step_ms']['median']:9.2f} ms "
                    f"(p10 {res['step_ms']['p10']:.2f}, p90 {res['step_ms']['p90']:.2f})")
        del runners, not_run
    if devices[0].platform == "cpu" and not s.peak_tflops and not s.compile_only:
        # Measured again at the end (machine drift, load): the best of both is the peak.
        for dtype, peak in report["peaks"].items():
            again = peaks.peak_for(bc, devices, dtype)["tflops"]
            peak["tflops_start_end"] = [peak["tflops"], again]
            peak["tflops"] = max(peak["tflops"], again)
            log(f"peak {dtype} at the end: {again:.3f} TFLOP/s; using {peak['tflops']:.3f}")
    for res in report["results"]:
        peak = report["peaks"].get(res["dtype"])
        if res["framework"] == "jax":
            res["utilisation"] = (res["achieved_tflops"] / peak["tflops"]
                                  if peak and res["achieved_tflops"] else None)
            res["utilisation_peak"] = {"dtype": res["dtype"],
                                       "tflops": peak and peak["tflops"]}
    report["device_memory_stats"] = device_memory_stats(devices)
    if "bfloat16" in bc.dtypes and not s.compile_only:
        for shape in bc.shapes[:1] if len(bc.shapes) > 2 else bc.shapes:
            log(f"bf16 loss check on {shape.name}")
            report["checks"].setdefault("bf16_loss", []).append(
                dtype_loss_check(bc, shape, devices=devices))
    report["comparisons"] = comparisons(report["results"], mode_of(bc.base.trainable))
    report["environment"]["load_average_end"] = _loadavg()
    report["finished"] = _now()
    return report


def comparisons(results: Sequence[dict], frozen_mode: str = "frozen") -> list[dict[str, Any]]:
    """Per JAX case: speed-up over the PyTorch reference of the same shape, mode and dtype
    (which trains one run at a time, as the original code: for a case of K runs the
    speed-up is PyTorch's one-run time over the per-run time, step time / K); per training
    case: time relative to the base model's full fine-tuning of the same shape/dtype/remat/K
    (a baseline's: without remat), and for a baseline's case relative to the base model's
    `frozen_mode` (the base config's selection) too; for sweeps, the per-run time relative
    to K=1 of the same shape/model/mode/dtype/remat."""
    def key(r, **over):
        k = {"shape": r["shape"]["name"], "model": r.get("model"), "mode": r["mode"],
             "dtype": r["dtype"], "remat": r["remat"], "framework": r["framework"],
             "runs": r.get("runs", 1), **over}
        return tuple(sorted(k.items()))
    timed = [r for r in results if r["step_ms"]]
    index = {key(r): r["step_ms"]["median"] for r in timed}
    out = []
    for r in timed:
        if r["framework"] != "jax":
            continue
        ms, runs = r["step_ms"]["median"], r.get("runs", 1)
        per_run = ms / runs
        baseline = r.get("model") is not None
        ref = index.get(key(r, framework="torch", remat=False, runs=1))
        # a baseline against the base model (model None) trained as full / frozen FPT
        full = (index.get(key(r, mode="full", model=None))
                if r["mode"] != "forward" and (baseline or r["mode"] != "full") else None)
        frozen = index.get(key(r, mode=frozen_mode, model=None)) if baseline else None
        one = index.get(key(r, runs=1))
        out.append({"case": r["case"], "runs": runs, "jax_ms": ms, "per_run_ms": per_run,
                    "torch_ms": ref,
                    "speedup_vs_torch": ref / per_run if ref else None,
                    "per_run_vs_torch": per_run / ref if ref else None,
                    "per_run_vs_k1": per_run / one if one else None,
                    "time_vs_full": ms / full if full else None,
                    "time_vs_frozen": ms / frozen if frozen else None})
    return out


def device_memory_stats(devices) -> dict[str, int] | None:
    """Device memory stats where the backend keeps them (GPU, TPU), the largest per device."""
    stats = {}
    for d in devices:
        try:
            s = d.memory_stats()
        except Exception:
            s = None
        if not s:
            return None
        for k in ("bytes_in_use", "peak_bytes_in_use", "bytes_limit"):
            if k in s:
                stats[k] = max(stats.get(k, 0), int(s[k]))
    return stats or None


def environment(devices) -> dict[str, Any]:
    def version(mod):
        try:
            return __import__(mod).__version__
        except Exception:
            return None
    cpu = platform.processor() or None
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f
                        if ln.startswith("model name")), cpu)
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, cwd=os.path.dirname(__file__), timeout=10
                                ).stdout.strip() or None
    except Exception:
        commit = None
    return {
        "backend": devices[0].platform, "device_kind": devices[0].device_kind,
        "local_devices": len(devices), "process_count": jax.process_count(),
        "global_devices": len(devices) * jax.process_count(),
        "cpu": cpu, "cpu_cores": os.cpu_count(), "python": platform.python_version(),
        "versions": {m: version(m) for m in ("jax", "jaxlib", "flax", "optax", "numpy",
                                             "torch", "transformers")},
        "git_commit": commit, "load_average": _loadavg(),
        "env": {k: os.environ[k] for k in PERF_ENV if k in os.environ},
    }


def env_prefix() -> str:
    """`NAME=value ...` of the speed-relevant variables set, to prefix a command with."""
    return " ".join(f"{k}={shlex.quote(os.environ[k])}" for k in PERF_ENV
                    if k in os.environ and k not in ("JAX_PLATFORMS", "TF_CPP_MIN_LOG_LEVEL"))


def _loadavg():
    try:
        return list(os.getloadavg())
    except OSError:
        return None


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
