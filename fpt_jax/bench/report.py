"""The report of a run as files: `<name>.json` (everything), `<name>.md` (the tables), and
for several sequence lengths `<name>.png` (tokens/s against sequence length)."""
from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from fpt_jax.bench.core import MINIMUM_BYTES_DEFINITION


def _bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _f(x, spec=".2f"):
    return "-" if x is None else format(x, spec)


def _times(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def _table(header: list[str], align: str, rows: list[list[Any]]) -> list[str]:
    """A markdown table; `align` has one letter per column: l(eft) or r(ight)."""
    rule = "|" + "|".join("---" if a == "l" else "---:" for a in align) + "|"
    return ["| " + " | ".join(header) + " |", rule,
            *("| " + " | ".join(str(c) for c in row) + " |" for row in rows)]


def _operands(dtype: str, accumulation: str | None) -> str:
    """'bfloat16 operands, float32 accumulation' where they differ, else the dtype."""
    return (f"{dtype} operands with {accumulation} accumulation and output"
            if accumulation and accumulation != dtype else dtype)


def markdown(report: dict[str, Any]) -> str:
    lines = _setting(report)
    for cmp in report.get("matmul_comparison", []):
        lines += ["", f"Matmuls of the backbone's weight shapes ({cmp['dtype']}, one device, "
                  f"PyTorch with {cmp['threads']} threads): what each library's matmuls reach "
                  "on the step's own weight shapes, best of several calls; XLA's as the step "
                  f"runs them ({_operands(cmp['dtype'], cmp.get('xla_accumulation'))}), "
                  f"PyTorch's `a @ b` of {cmp['dtype']}.", ""]
        lines += _table(["rows x in @ in x out", "XLA GFLOP/s", "PyTorch GFLOP/s",
                         "XLA / PyTorch"], "lrrr",
                        [[f"{r['m']}x{r['k']} @ {r['k']}x{r['n']}", f"{r['xla_tflops'] * 1e3:.0f}",
                          f"{r['torch_tflops'] * 1e3:.0f}", f"{r['ratio']:.2f}"]
                         for r in cmp["sizes"]])
    lines += ["", "% of peak: the case's achieved FLOP/s (XLA's FLOPs of the compiled step "
              "over its median time) against the peak of the case's own dtype (Peak above). "
              "Bytes, per device: XLA's bytes accessed by the compiled step (cost analysis) "
              "against the minimum a step must touch, which is " + MINIMUM_BYTES_DEFINITION
              + ".", ""]
    base_model = report["config"]["base"]["model"]
    lines += _table(
        ["shape (batch x tokens x feat)", "model", "mode", "dtype", "remat", "runs K",
         "framework", "ms/step median", "p10-p90", "tokens/s", "GFLOP/step", "GFLOP/s",
         "% of peak", "minimum bytes/step", "bytes accessed / minimum", "peak mem/device",
         "compile s"], "lllllrlrrrrrrrrrr",
        [_result_row(r, base_model) for r in report["results"]])
    lines += _lstm_note(report)
    comps = [c for c in report["comparisons"]
             if c["speedup_vs_torch"] is not None or c["time_vs_full"] is not None
             or c.get("time_vs_frozen") is not None]
    if comps:
        lines += [""] + _table(
            ["case", "fpt-jax ms", "PyTorch ms", "speed-up vs PyTorch (per run)",
             f"time vs {base_model} full fine-tuning", f"time vs {base_model} frozen"],
            "lrrrrr",
            [[c["case"], f"{c['jax_ms']:.2f}", _f(c["torch_ms"]),
              _f(c["speedup_vs_torch"]) + ("x" if c["speedup_vs_torch"] else ""),
              _f(c["time_vs_full"]), _f(c.get("time_vs_frozen"))] for c in comps])
    lines += _sweep_table(report)
    for chk in report["checks"].get("bf16_loss", []):
        lines += ["", f"bfloat16 loss check ({chk['shape']}, eval loss at init): float32 "
                  f"{chk['loss_float32']:.5f}, bfloat16 {chk['loss_bfloat16']:.5f}, relative "
                  f"difference {chk['rel_diff']:.2e} (tolerance {chk['rtol']}): "
                  f"{'within' if chk['within_tolerance'] else 'OUTSIDE'} tolerance."]
    hlo_rows = [r for r in report["results"] if r.get("hlo")]
    if hlo_rows:
        lines += ["", "Compiled step per device (XLA): dot ops, all-reduced elements (the "
                  "trainable gradients plus metric scalars), bytes accessed against the "
                  "minimum (defined above), memory.", ""]
        lines += _table(
            ["case", "trainable params", "dot ops", "all-reduce ops", "all-reduced elements",
             "bytes accessed", "minimum bytes", "accessed / minimum", "arguments",
             "temporaries", "donated (aliased)"], "lrrrrrrrrrr",
            [[r["case"], f"{r['trainable_params']:,}", r["hlo"]["dot_ops"],
              r["hlo"]["all_reduce_ops"], f"{r['hlo']['all_reduce_elements']:,}",
              _bytes(r["bytes_accessed_per_step_per_device"]),
              _bytes(r.get("minimum_bytes_per_step_per_device")),
              _times(r.get("bytes_accessed_vs_minimum")),
              *(_bytes((r["memory_per_device"] or {}).get(k))
                for k in ("argument", "temp", "alias"))] for r in hlo_rows])
    if report.get("device_memory_stats"):
        lines += ["", "Device memory stats (whole run): " + ", ".join(
            f"{k} {_bytes(val)}" for k, val in report["device_memory_stats"].items())]
    return "\n".join(lines) + "\n"


def _setting(report: dict[str, Any]) -> list[str]:
    """The command, machine, versions, model, method, peaks and reference, as prose."""
    env, m = report["environment"], report["model"]
    base, bc = report["config"]["base"], report["config"]["bench"]
    env_vars = " ".join(f"{k}={v}" for k, v in env["env"].items()) or "(none set)"
    load = [(x or [None])[0] for x in (env["load_average"], env.get("load_average_end"))]
    lines = ["# fpt-jax benchmark", "", f"Command: `{report['command']}`", "",
             f"Measured {report['started']} on {env['backend']} ({env['device_kind']}; CPU "
             f"{env['cpu']}, {env['cpu_cores']} cores), {env['local_devices']} local device(s) "
             f"x {env['process_count']} process(es); environment `{env_vars}`; load average "
             f"at start {_f(load[0])}, at end {_f(load[1])}.", "",
             "Versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v)
             + f", python {env['python']}; fpt-jax commit {env['git_commit']}.", "",
             f"Model: {m.get('family', 'gpt2')} preset `{base['model']}` (random init: time "
             "and FLOPs do not depend "
             f"on the weights), {m['n_layer']} layers, width {m['n_embd']}, {m['n_head']} "
             f"heads; dropout {base['dropout']}; frozen = trainable `{base['trainable']}`. "
             f"{bc['steps']} timed steps per case after {bc['warmup']} warm-up steps, "
             f"interleaved over {bc['rounds']} rounds (A B C .. A B C ..), each turn after "
             f"{bc['switch_steps']} untimed step(s)."]
    for dtype, peak in report["peaks"].items():
        if not peak:
            continue
        text = (f"Peak ({dtype}): {peak['tflops'] * 1e3:.0f} GFLOP/s over {peak['devices']} "
                f"device(s), {peak['source']}")
        if "accumulation" in peak:  # measured: matmuls as the step runs them
            text += f" matmuls of {_operands(peak['operands'], peak['accumulation'])}"
        if "matmuls" in peak:
            text += " (best of " + ", ".join(
                f"{x['m']}x{x['k']}@{x['k']}x{x['n']}: {x['tflops'] * 1e3:.0f}"
                for x in peak["matmuls"]) + " GFLOP/s)"
        if "tflops_start_end" in peak:
            start, end = (1e3 * t for t in peak["tflops_start_end"])
            text += (f"; measured at the start {start:.0f} and at the end {end:.0f} GFLOP/s, "
                     "the best counts")
        lines += ["", text + "."]
    if report.get("baselines"):
        lines += ["", "Baselines, timed next to the model above (random init; the selection "
                  "of its family's comparison row, `fpt_jax.rows`; no "
                  "remat; no PyTorch reference, which is GPT-2's recipe): " + "; ".join(
                      f"`{name}` ({b['family']}, {b['n_layer']} layers, width {b['n_embd']}, "
                      "trains `" + ", ".join(sorted({r["trainable"] for r in report["results"]
                                                     if r.get("model") == name})) + "`)"
                      for name, b in report["baselines"].items()) + "."]
    ref = next((r for r in report["results"] if r["framework"] == "torch"), None)
    if ref:
        lines += ["", f"PyTorch reference: the original recipe on {ref['device']}, "
                  f"{ref['threads']} threads, attention `{ref['attn_implementation']}`."]
    elif report.get("torch_reference_note"):
        lines += ["", f"PyTorch reference {report['torch_reference_note']}."]
    return lines


def _sweep_table(report: dict[str, Any]) -> list[str]:
    """K runs in one vmapped step: per-run time against K=1 and the PyTorch recipe's one run,
    utilisation, and the compiled step's arguments (the backbone once, K x the run state)."""
    rows = [r for r in report["results"] if r["framework"] == "jax" and r["mode"] != "forward"]
    if not any(r.get("runs", 1) != 1 for r in rows):
        return []
    comp = {c["case"]: c for c in report["comparisons"]}
    lines = ["", "Sweeps: K runs trained by one vmapped step (fpt_jax.steps; the backbone read "
             "once for all K runs). K=1 is the single-run training step. Per-run time = step "
             "time / K; PyTorch's time is the original recipe's, one run per step (as the "
             "original code trains). Arguments: the compiled step's per device (backbone + "
             "K x run state + K batches).", ""]
    body = []
    for r in rows:
        c, st, util = comp.get(r["case"], {}), r["step_ms"], r.get("utilisation")
        pr = r.get("per_run_ms")
        body.append([
            r["case"], r.get("runs", 1),
            *([f"{st['median']:.2f}", f"{st['p10']:.2f}-{st['p90']:.2f}",
               f"{pr['median']:.2f}", f"{pr['p10']:.2f}-{pr['p90']:.2f}"]
              if st else [r.get("skipped", "not run"), "-", "-", "-"]),
            _f(c.get("per_run_vs_k1")), _f(c.get("torch_ms")), _f(c.get("per_run_vs_torch")),
            _f(r.get("flops_per_step") and r["flops_per_step"] / 1e9, ".4g"),
            _f(r.get("achieved_tflops") and r["achieved_tflops"] * 1e3, ".0f"),
            _f(util and 100 * util, ".1f"),
            _bytes(r.get("argument_bytes")), _bytes(r.get("backbone_bytes")),
            _bytes(r.get("run_state_bytes"))])
    return lines + _table(
        ["case", "K", "ms/step median", "p10-p90", "ms/run median", "ms/run p10-p90",
         "per run vs K=1", "PyTorch one run ms", "per run / PyTorch", "GFLOP/step", "GFLOP/s",
         "% of peak", "arguments", "backbone", "run state"], "lrrrrrrrrrrrrrr", body)


def _lstm_note(report: dict[str, Any]) -> list[str]:
    """What the LSTM's recurrence costs, from its timed rows: the sequential steps of a step
    and the time per sequential step."""
    grad_accum = report["config"]["base"].get("grad_accum", 1)
    body = []
    for r in report["results"]:
        b = (report.get("baselines") or {}).get(r.get("model")) or report["model"]
        if r["framework"] != "jax" or not r["step_ms"] or b.get("family") != "lstm":
            continue
        training = r["mode"] != "forward"
        accum = grad_accum if training else 1
        t, passes = r["shape"]["seq_len"], 2 if training else 1
        steps = accum * b["n_layer"] * t * passes
        rows = r["shape"]["batch_size"] // (r["global_devices"] * accum)
        ms, util = r["step_ms"]["median"], r.get("utilisation")
        body.append([r["case"], b["n_layer"], t, passes, accum,
                     f"[{rows}, {b['n_embd']}] x [{b['n_embd']}, {4 * b['n_embd']}]"
                     + (f" x {r['runs']} runs" if r.get("runs", 1) != 1 else ""),
                     steps, f"{ms:.2f}", f"{ms / steps:.4f}", _f(util and 100 * util, ".1f")])
    if not body:
        return []
    return ["", "LSTM: each layer runs its recurrence as a `lax.scan` over the T tokens of an "
            "example, T dependent steps of one `[batch, H] x [H, 4H]` product (batch per "
            "device) with two layer norms and the gates; a training step runs them forward and "
            "again, in reverse, backward (and per micro-batch with grad_accum). Each product is "
            "too small to use the machine's matmul throughput, so the step costs the latency "
            "of its sequential steps: layers x T x passes (2 training, 1 forward) x "
            "grad_accum, and the time per sequential step is the step time over that.", ""
            ] + _table(["case", "layers", "T", "passes", "grad_accum", "product per step",
                        "sequential steps/step", "ms/step median", "ms per sequential step",
                        "% of peak"], "lrrrrlrrrr", body)


def _result_row(r: dict[str, Any], base_model: str) -> list[str]:
    s, st = r["shape"], r["step_ms"]
    timing = ([f"{st['median']:.2f}", f"{st['p10']:.2f}-{st['p90']:.2f}",
               f"{r['tokens_per_s']:.0f}"] if st else [r.get("skipped", "not run"), "-", "-"])
    util = r.get("utilisation")
    return [f"{s['name']} ({s['batch_size']}x{s['seq_len']}x{s['features']})",
            r.get("model") or base_model, r["mode"],
            r["dtype"], "yes" if r["remat"] else "no", r.get("runs", 1), r["framework"], *timing,
            _f(r.get("flops_per_step") and r["flops_per_step"] / 1e9, ".4g"),
            _f(r.get("achieved_tflops") and r["achieved_tflops"] * 1e3, ".0f"),
            _f(util and 100 * util, ".1f"),
            _bytes(r.get("minimum_bytes_per_step_per_device")),
            _times(r.get("bytes_accessed_vs_minimum")),
            _bytes((r.get("memory_per_device") or {}).get("peak_estimate")),
            _f(r.get("compile_s"), ".1f")]


def scaling_series(report: dict[str, Any]) -> dict[str, list[tuple[int, float]]]:
    """tokens/s against sequence length per (framework, model, mode, dtype, remat) series."""
    series: dict[str, list[tuple[int, float]]] = {}
    for r in report["results"]:
        if r["shape"]["name"] not in report["scaling_shapes"] or not r["tokens_per_s"]:
            continue
        name = (("fpt-jax " if r["framework"] == "jax" else "PyTorch ")
                + (f"{r['model']} " if r.get("model") else "") + r["mode"])
        name += (f" {r['dtype']}" if r["dtype"] != "float32" else "") + (
            " remat" if r["remat"] else "")
        series.setdefault(name, []).append((r["shape"]["seq_len"], r["tokens_per_s"]))
    return {k: sorted(v) for k, v in series.items()}


def scaling_table(report: dict[str, Any]) -> str:
    series = scaling_series(report)
    lens = sorted({t for pts in series.values() for t, _ in pts})
    return "\n".join(_table(["tokens/s", *map(str, lens)], "l" + "r" * len(lens),
                            [[name, *(_f(dict(pts).get(t), ".0f") for t in lens)]
                             for name, pts in series.items()])) + "\n"


def plot_scaling(report: dict[str, Any], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    series = scaling_series(report)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, pts in series.items():
        xs, ys = zip(*pts)
        ax.plot(xs, ys, marker="o", linestyle="--" if name.startswith("PyTorch") else "-",
                label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    lens = sorted({t for pts in series.values() for t, _ in pts})
    ax.set_xticks(lens)
    ax.set_xticklabels([str(t) for t in lens])
    ax.set_xlabel("sequence length (tokens)")
    ax.set_ylabel("tokens / s (training step)")
    env, m = report["environment"], report["model"]
    batch = "/".join(str(b) for b in sorted({r["shape"]["batch_size"] for r in report["results"]
                                             if r["shape"]["name"] in report["scaling_shapes"]}))
    ax.set_title(f"{report['config']['base']['model']} ({m['n_layer']}x{m['n_embd']}), batch "
                 f"{batch}, {env['device_kind']} x{env['global_devices']}", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(report: dict[str, Any], out_dir: str, name: str, plot: bool | None = None
          ) -> dict[str, str]:
    """Writes `<name>.json`, `<name>.md` and (`plot`; default: for several sequence
    lengths) `<name>.png`; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {"json": os.path.join(out_dir, f"{name}.json"),
             "markdown": os.path.join(out_dir, f"{name}.md")}
    with open(paths["json"], "w") as f:
        json.dump(report, f, indent=1, default=lambda x: x.item() if isinstance(
            x, (np.floating, np.integer)) else repr(x))
        f.write("\n")
    text = markdown(report)
    if plot if plot is not None else len(report["scaling_shapes"]) > 1:
        paths["png"] = os.path.join(out_dir, f"{name}.png")
        plot_scaling(report, paths["png"])
        text += ("\n## Scaling with sequence length\n\n"
                 f"![tokens/s against sequence length]({name}.png)\n\n" + scaling_table(report))
    with open(paths["markdown"], "w") as f:
        f.write(text)
    return paths
