"""The benchmark: it runs and writes its report; the step it times is the training step,
donating its state, reading the frozen parameters in place, all-reducing only trainable
gradients; remat and bf16 are faithful; the CLI takes the training config (`--config`) and
the benchmark's settings (`--bench.<field>`, every field of `BenchConfig`).

Runs under the root conftest's 4 forced CPU devices, on a tiny GPT-2.
"""
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from absl import flags

from experiments import benchmark as benchmark_cli
from experiments import cli
from fpt_jax import bench, build, freeze, rows, steps, tasks
from fpt_jax.models.fpt import make_model
from fpt_jax.bench import core, jax_step, peaks, report as report_lib, torch_ref
from fpt_jax.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
# One block and no dropout keep XLA's CPU compiles (the bulk of these tests' time) short.
BASE = TrainConfig(init="random", n_layer=1, n_head=2, n_embd=16, dropout=0.0)
SHAPE = bench.Shape("tiny", batch_size=4, seq_len=6, features=3, classes=5)
TINY_SETTINGS = dict(warmup=2, steps=2, rounds=2, torch_threads=2)


def tiny(base: TrainConfig = BASE, shapes=(SHAPE,), **settings) -> bench.Bench:
    """The tiny benchmark, with `settings` (BenchConfig fields) changed."""
    return bench.Bench(base, bench.BenchConfig(**{**TINY_SETTINGS, **settings}), shapes)


TINY = tiny()


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
    """XLA compiles of identical programs (each setup's init, the same step twice) are
    shared through a throw-away persistent cache: it keeps these tests fast on 2 cores."""
    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes")
    old = {n: getattr(jax.config, n) for n in names}
    jax.config.update(names[0], str(tmp_path_factory.mktemp("xla_cache")))
    jax.config.update(names[1], 0.0)
    jax.config.update(names[2], 0)
    yield
    for n, v in old.items():
        jax.config.update(n, v)


@pytest.fixture(scope="module")
def report():
    assert jax.local_device_count() == 4, "conftest forces 4 CPU devices"
    # A peak from the setting keeps the test from timing large matmuls; the measured peak
    # has its own test below.
    return bench.run(tiny(peak_tflops=0.05), command="pytest", log=None)


@pytest.mark.slow
def test_report_is_written_as_json_and_markdown(report, tmp_path):
    paths = bench.write(report, str(tmp_path), "tiny")
    data = json.loads(open(paths["json"]).read())
    assert data["command"] == "pytest"
    env = data["environment"]
    assert env["backend"] == "cpu" and env["local_devices"] == 4
    assert env["versions"]["jax"] == jax.__version__
    assert data["config"]["base"]["n_layer"] == 1 and data["model"]["n_embd"] == 16
    assert data["config"]["bench"]["steps"] == TINY.settings.steps == 2
    jax_rows = [r for r in data["results"] if r["framework"] == "jax"]
    assert {r["mode"] for r in jax_rows} == {"frozen", "full", "forward"}
    for r in jax_rows:
        assert r["step_ms"]["n"] == TINY.settings.steps
        assert 0 < r["step_ms"]["p10"] <= r["step_ms"]["median"] <= r["step_ms"]["p90"]
        assert r["tokens_per_s"] == pytest.approx(SHAPE.tokens / r["step_ms"]["median"] * 1e3)
        assert r["compile_s"] > 0 and r["achieved_tflops"] > 0 and r["utilisation"] > 0
        assert r["memory_per_device"]["peak_estimate"] > 0
        assert r["bytes_accessed_per_step_per_device"] > 0
    md = open(paths["markdown"]).read()
    assert "`pytest`" in md and f"jax {jax.__version__}" in md
    assert [ln for ln in md.splitlines() if ln.startswith("|")], md
    # every row of a table has as many cells as its header
    block = []
    for ln in md.splitlines() + [""]:
        if ln.startswith("|"):
            block.append(ln.count("|"))
        elif block:
            assert len(set(block)) == 1, md
            block = []
    assert "png" not in paths  # one sequence length: no scaling plot


@pytest.mark.slow
def test_flops_positive_and_full_costs_more_than_frozen(report):
    by_mode = {r["mode"]: r for r in report["results"] if r["framework"] == "jax"}
    flops = {m: r["flops_per_step"] for m, r in by_mode.items()}
    assert all(f > 0 for f in flops.values()), flops
    assert flops["forward"] < flops["frozen"] < flops["full"], flops
    # frozen attention/MLP weights: no weight-gradient matmuls in the compiled step
    dots = {m: r["hlo"]["dot_ops"] for m, r in by_mode.items()}
    assert dots["frozen"] < dots["full"], dots


@pytest.mark.slow
def test_frozen_step_all_reduces_exactly_the_trainable_gradients(report):
    for r in report["results"]:
        if r["framework"] != "jax" or r["mode"] == "forward":
            continue
        h = r["hlo"]
        assert h["all_reduce_ops"] >= 1
        # the metrics (loss, accuracy) also cross devices: one value per run each (the step
        # is the group step, vmapped over K runs, K = 1 here: metrics of shape [K])
        assert r["runs"] == 1
        metrics = 2 * r["runs"]
        assert h["all_reduce_elements"] - metrics == r["trainable_params"], (
            r["mode"], h, r["trainable_params"])
    frozen = next(r for r in report["results"] if r["mode"] == "frozen")
    full = next(r for r in report["results"] if r["mode"] == "full")
    assert frozen["trainable_params"] < full["trainable_params"] == full["total_params"]


@pytest.mark.slow
def test_torch_reference_is_interleaved_and_compared(report):
    if not torch_ref.torch_available():
        pytest.skip("torch/transformers not installed")
    torch_rows = {r["mode"]: r for r in report["results"] if r["framework"] == "torch"}
    assert set(torch_rows) == {"frozen", "full", "forward"}
    jax_rows = {r["mode"]: r for r in report["results"] if r["framework"] == "jax"}
    # the reference freezes exactly what fpt-jax freezes
    for mode in ("frozen", "full"):
        assert torch_rows[mode]["trainable_params"] == jax_rows[mode]["trainable_params"]
    comp = {c["case"]: c for c in report["comparisons"]}
    assert comp["tiny/frozen/float32"]["speedup_vs_torch"] > 0
    assert comp["tiny/frozen/float32"]["time_vs_full"] > 0
    # XLA's and PyTorch's matmul rates on the backbone's own weight shapes, side by side
    (cmp,) = report["matmul_comparison"]
    w, rows = BASE.n_embd, SHAPE.tokens
    assert [(r["m"], r["k"], r["n"]) for r in cmp["sizes"]] == [(rows, w, 4 * w),
                                                                (rows, 4 * w, w)]
    for r in cmp["sizes"]:
        assert r["xla_tflops"] > 0 and r["torch_tflops"] > 0
        assert r["ratio"] == pytest.approx(r["xla_tflops"] / r["torch_tflops"])


@pytest.mark.slow
def test_train_step_donates_its_state_and_reads_frozen_in_place(report):
    for r in report["results"]:
        if r["framework"] == "jax":
            assert r["state_donated"] is (r["mode"] != "forward" or None), r["case"]
    r = jax_step.JaxRunner(TINY, bench.Case(SHAPE, "fpt"))
    state, frozen = r.state, r.frozen
    r.run_step()
    leaves = jax.tree_util.tree_leaves(state)
    assert leaves and all(x.is_deleted() for x in leaves)
    assert not any(x.is_deleted() for x in jax.tree_util.tree_leaves(r.state))
    # the frozen parameters are an input only: the same buffers, alive, after the step
    assert r.frozen is frozen and jax.tree_util.tree_leaves(frozen)
    assert not any(x.is_deleted() for x in jax.tree_util.tree_leaves(frozen))


@pytest.fixture(scope="module")
def sweep_report():
    # 'output,ln': the position embeddings stay in the (shared) backbone, so that even this
    # tiny model's backbone outweighs a few runs' states.
    bc = tiny(modes=["forward"], selections="output,ln", sweeps=[1, 4], peak_tflops=0.05)
    return bench.run(bc, command="pytest sweeps", log=None)


@pytest.mark.slow
def test_sweep_cases_report_per_run_times_against_one_run_and_pytorch(sweep_report, tmp_path):
    rows = {(r["mode"], r["runs"]): r for r in sweep_report["results"]
            if r["framework"] == "jax"}
    assert set(rows) == {("output,ln", 1), ("output,ln", 4), ("forward", 1)}  # no swept eval
    k1, k4 = rows["output,ln", 1], rows["output,ln", 4]
    assert k4["case"] == "tiny/output,ln/float32/K4" and k1["case"] == "tiny/output,ln/float32"
    for r in (k1, k4):
        assert r["per_run_ms"]["median"] == pytest.approx(r["step_ms"]["median"] / r["runs"])
        assert r["tokens_per_s"] == pytest.approx(
            r["runs"] * SHAPE.tokens / r["step_ms"]["median"] * 1e3)
        assert r["state_donated"] is True and r["utilisation"] > 0
    # K runs: K times the FLOPs (the same step vmapped), K x the trainable parameters
    assert k4["flops_per_step"] == pytest.approx(4 * k1["flops_per_step"], rel=0.05)
    assert k4["trainable_params"] == 4 * k1["trainable_params"]
    comp = {c["case"]: c for c in sweep_report["comparisons"]}
    c1, c4 = comp[k1["case"]], comp[k4["case"]]
    assert c1["per_run_vs_k1"] == 1.0 and c4["runs"] == 4
    assert c4["per_run_vs_k1"] == pytest.approx(
        k4["step_ms"]["median"] / 4 / k1["step_ms"]["median"])
    if torch_ref.torch_available():  # PyTorch's one run against the per-run time
        assert c4["torch_ms"] == c1["torch_ms"] > 0
        assert c4["per_run_vs_torch"] == pytest.approx(c4["per_run_ms"] / c4["torch_ms"])
    md = open(bench.write(sweep_report, str(tmp_path), "sw")["markdown"]).read()
    assert "Sweeps: K runs" in md
    line = next(ln for ln in md.splitlines() if ln.startswith("| tiny/output,ln/float32/K4 | 4 |"))
    assert f"| {c4['per_run_vs_k1']:.2f} |" in line


@pytest.mark.slow
def test_sweep_step_holds_the_backbone_once(sweep_report):
    """The compiled sweep step's arguments grow with K x the run's state (trainable
    parameters, optimizer state, own frozen parts) and its batch, not K x the backbone."""
    rows = {r["runs"]: r for r in sweep_report["results"]
            if r["framework"] == "jax" and r["mode"] == "output,ln"}
    k1, k4 = rows[1], rows[4]
    grown = k4["argument_bytes"] - k1["argument_bytes"]
    assert k1["backbone_bytes"] == k4["backbone_bytes"] > 0
    assert 0 < grown < k1["backbone_bytes"], (grown, k1["backbone_bytes"])
    # 3 more runs' states (+ their learning rates) and batches, nothing else
    assert 3 * k1["run_state_bytes"] <= grown <= 3 * k1["run_state_bytes"] + 3 * 1024, (
        grown, k1["run_state_bytes"])
    # the minimum bytes: the backbone (read twice) once, everything else per run
    backbone_twice = 2 * k1["backbone_bytes"]
    assert (k4["minimum_bytes_per_step_per_device"] - backbone_twice
            == 4 * (k1["minimum_bytes_per_step_per_device"] - backbone_twice))


# --- baselines timed next to the base model ---------------------------------------------

BASELINES = tiny(modes=["frozen"], baselines=["lstm", "fnet"], peak_tflops=0.05)


def test_baseline_cases_train_the_papers_selection_of_their_model():
    settings = dict(modes=["frozen", "full", "forward"], remats=[False, True], sweeps=[1, 4])
    bc = tiny(baselines=["lstm", "fnet"], **settings)
    cases = bc.cases(SHAPE)
    baseline = [c for c in cases if c.model]
    assert [c.label for c in baseline] == [
        "tiny/lstm/full/float32", "tiny/lstm/full/float32/K4",
        "tiny/fnet/frozen/float32", "tiny/fnet/frozen/float32/K4"]
    # the rows' selections (fpt_jax.rows): the LSTM fully trained, FNet frozen as FPT; no remat
    assert [(c.model, c.trainable, c.remat) for c in baseline[::2]] == [
        ("lstm", "full", False), ("fnet", "fpt", False)]
    # the base model's cases come first, as without baselines (remat swept for them only)
    assert cases[:-4] == tiny(**settings).cases(SHAPE)
    assert {c.model for c in cases[:-4]} == {None}


def test_train_config_of_an_lstm_case_is_a_random_fully_trained_lstm_at_the_base_sizes():
    (case,) = [c for c in BASELINES.cases(SHAPE) if c.model == "lstm"]
    cfg = BASELINES.train_config(case)
    assert (cfg.model, cfg.init, cfg.trainable, cfg.n_head, cfg.remat) == (
        "lstm", "random", "full", None, False)
    # the row 'lstm' of fpt_jax.rows, not a definition of the benchmark's own
    row = rows.apply(dataclasses.replace(BASE, n_head=None), "lstm")
    assert (cfg.learning_rate, cfg.trainable) == (row.learning_rate, row.trainable)
    assert cfg.learning_rate == rows.LSTM_LEARNING_RATE != BASE.learning_rate
    assert (cfg.task, cfg.batch_size) == ("synthetic", SHAPE.batch_size)
    config, params = build.backbone(cfg)
    assert params is None and type(config).__name__ == "LSTMConfig"
    assert (config.n_layer, config.n_embd) == (BASE.n_layer, BASE.n_embd)  # stays small
    # without size overrides the preset's: the paper's 3 x 768 LSTM
    big = bench.Bench(TrainConfig(), bench.BenchConfig(baselines=["lstm"]))
    assert (big.backbone("lstm").n_layer, big.backbone("lstm").n_embd) == (3, 768)


@pytest.mark.slow
@pytest.mark.parametrize("model, trainable", [("lstm", "full"), ("fnet", "fpt")])
def test_a_baseline_step_runs_and_reports_bytes_against_the_minimum(model, trainable):
    r = jax_step.JaxRunner(BASELINES, bench.Case(SHAPE, trainable, model=model))
    r.compile()
    assert r.run_step() > 0
    res = r.result()
    mode = {"full": "full", "fpt": "frozen"}[trainable]
    assert res["model"] == model and res["case"] == f"tiny/{model}/{mode}/float32"
    # float32 parameters: 2 x 4 bytes for every one + 9 x 4 for the trainable ones
    assert res["minimum_bytes_per_step_per_device"] == (8 * res["total_params"]
                                                        + 36 * res["trainable_params"])
    if trainable == "full":
        assert res["trainable_params"] == res["total_params"]
    else:
        assert 0 < res["trainable_params"] < res["total_params"]
    assert res["bytes_accessed_vs_minimum"] == pytest.approx(
        res["bytes_accessed_per_step_per_device"] / res["minimum_bytes_per_step_per_device"])


@pytest.fixture(scope="module")
def baseline_report():
    return bench.run(BASELINES, command="pytest baselines", log=None)


@pytest.mark.slow
def test_baselines_are_timed_next_to_the_base_model_without_a_torch_reference(baseline_report):
    rows = {(r["framework"], r["model"]): r for r in baseline_report["results"]}
    jax_rows = {m for f, m in rows if f == "jax"}
    assert jax_rows == {None, "lstm", "fnet"}
    # the reference (GPT-2's recipe) for the base model's case only
    assert {m for f, m in rows if f == "torch"} == ({None} if torch_ref.torch_available()
                                                    else set())
    assert baseline_report["baselines"]["lstm"] == {"family": "lstm", "n_layer": 1,
                                                    "n_head": 1, "n_embd": 16}
    for m in jax_rows:
        r = rows["jax", m]
        assert r["step_ms"]["n"] == BASELINES.settings.steps and r["step_ms"]["p10"] > 0
    comp = {c["case"]: c for c in baseline_report["comparisons"]}
    lstm, frozen = rows["jax", "lstm"], rows["jax", None]
    c = comp["tiny/lstm/full/float32"]
    assert c["torch_ms"] is None and c["speedup_vs_torch"] is None
    # against the base model's frozen case, not against the FNet case of the same mode
    assert c["time_vs_frozen"] == pytest.approx(lstm["step_ms"]["median"]
                                                / frozen["step_ms"]["median"])
    assert comp["tiny/frozen/float32"]["time_vs_frozen"] is None


@pytest.mark.slow
def test_report_names_baseline_rows_and_what_the_lstm_scan_costs(baseline_report, tmp_path):
    md = Path(bench.write(baseline_report, str(tmp_path), "bl")["markdown"]).read_text()
    lines = md.splitlines()
    assert any(ln.startswith("| tiny (4x6x3) | lstm | full |") for ln in lines), md
    assert any(ln.startswith("| tiny (4x6x3) | fnet | frozen |") for ln in lines), md
    assert any(ln.startswith("| tiny (4x6x3) | gpt2 | frozen |") for ln in lines), md
    lstm = next(r for r in baseline_report["results"] if r["model"] == "lstm")
    # 1 layer x 6 tokens x 2 passes (forward, backward) = 12 sequential steps
    start = next(i for i, ln in enumerate(lines) if ln.startswith("LSTM: ") and "lax.scan" in ln)
    end = lines.index("", start + 2)
    rows = [ln for ln in lines[start + 2:end] if not ln.startswith(("| case", "|---"))]
    assert rows == [f"| tiny/lstm/full/float32 | 1 | 6 | 2 | 1 | [1, 16] x [16, 64] | 12 | "
                    f"{lstm['step_ms']['median']:.2f} | {lstm['step_ms']['median'] / 12:.4f} | "
                    f"{100 * lstm['utilisation']:.1f} |"], md  # the LSTM's row only


def test_lstm_note_counts_layers_tokens_passes_and_micro_batches():
    def row(mode, model="lstm"):
        return {"framework": "jax", "model": model, "mode": mode, "case": f"c/{mode}",
                "shape": {"seq_len": 10, "batch_size": 16}, "global_devices": 2, "runs": 1,
                "step_ms": {"median": 60.0}, "utilisation": 0.01}
    report = {"config": {"base": {"grad_accum": 2}}, "model": {"family": "gpt2"},
              "baselines": {"lstm": {"family": "lstm", "n_layer": 3, "n_embd": 8}},
              "results": [row("full"), row("forward"), row("frozen", model=None)]}
    body = [ln for ln in report_lib._lstm_note(report) if ln.startswith("| c/")]
    # training: 3 layers x 10 tokens x 2 passes x 2 micro-batches of 16 / (2 x 2) rows
    assert body == ["| c/full | 3 | 10 | 2 | 2 | [4, 8] x [8, 32] | 120 | 60.00 | 0.5000 | 1.0 |",
                    "| c/forward | 3 | 10 | 1 | 1 | [8, 8] x [8, 32] | 30 | 60.00 | 2.0000 | 1.0 |"]
    report["baselines"] = {}
    assert report_lib._lstm_note(report) == []  # no LSTM row: no note


def test_baselines_accept_lstm_and_fnet_presets_only():
    for bad in (["gpt2"], ["lstm", "nonsense"]):
        with pytest.raises(ValueError, match=r"unknown baseline '(gpt2|nonsense)'; accepted: "
                                             r"fnet, fnet-medium, fnet-orthonormal, lstm"):
            tiny(baselines=bad)
    # A group named by hand that a baseline (FNet: no attention) lacks: refused before timing
    with pytest.raises(ValueError, match=r"--bench.baselines=fnet: fnet: trainable='output,"
                                         r"attn': this model has no attn parameters"):
        tiny(base=dataclasses.replace(BASE, trainable="output,attn"), baselines=["fnet"])
    # FNet's position table limits the shapes even when the base model (an LSTM) has none
    lstm_base = TrainConfig(model="lstm", init="random", n_layer=1, n_embd=16, dropout=0.0)
    long = bench.Shape("long", batch_size=4, seq_len=2048, features=3, classes=5)
    bench.Bench(lstm_base, shapes=[long]).check_shapes(4)
    with pytest.raises(core.ShapeError, match="baseline fnet's n_positions=1024"):
        bench.Bench(lstm_base, bench.BenchConfig(baselines=["fnet"]), [long]).check_shapes(4)


@pytest.mark.slow
def test_remat_gives_the_same_loss_and_gradients():
    task = SHAPE.task()
    batch = task.batch("train", 0, 4, seed=0)
    rng = jax.random.PRNGKey(3)
    # Two blocks: the last one, computed only where the head reads, is never rematted.
    cfg = dataclasses.replace(BASE, n_layer=2, trainable="full", dropout=0.1)
    g = build.build_group(cfg, task=task)
    frozen = {k: v if k == steps.BACKBONE else steps.unstack(v, 0) for k, v in g.frozen.items()}
    params = freeze.merge(steps.unstack(g.states.trainable, 0), frozen)
    out = {}
    for remat in (False, True):
        model = make_model(dataclasses.replace(cfg, remat=remat), task, g.config)
        assert model.remat is remat

        def loss(params, model=model):
            logits = model.apply({"params": params}, batch["x"], deterministic=False,
                                 rngs={"dropout": rng})
            return task.per_example_metrics(logits, batch)["loss"].mean()
        out[remat] = jax.jit(jax.value_and_grad(loss))(params)
    (l0, g0), (l1, g1) = out[False], out[True]
    np.testing.assert_allclose(l0, l1, rtol=1e-6)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5,
                                                                  atol=1e-7), g0, g1)


@pytest.mark.slow
def test_remat_reduces_compiled_peak_memory():
    """Per-block remat must keep only the block inputs across the forward pass plus one
    block's activations: the compiled frozen train step (pmapped, state donated, dropout
    on) needs well under half the temporaries of the step without remat. With `nn.remat`
    on XLA:CPU it did not: the recomputation ran in the forward pass (models/remat.py)."""
    bc = bench.Bench(dataclasses.replace(BASE, n_layer=4, n_embd=64, dropout=0.1,
                                         num_devices=1), bench.BenchConfig(torch_reference=False))
    shape = bench.Shape("long", batch_size=1, seq_len=256, features=4, classes=5)
    temp, dots = {}, {}
    for remat in (False, True):
        r = jax_step.JaxRunner(bc, bench.Case(shape, "fpt", "float32", remat))
        r.compile()
        temp[remat], dots[remat] = r.memory["temp"], r.hlo["dot_ops"]
    assert dots[True] > dots[False], dots  # it does recompute
    assert temp[True] <= 0.5 * temp[False], temp


@pytest.mark.slow
def test_bf16_loss_within_stated_tolerance():
    chk = jax_step.dtype_loss_check(TINY, SHAPE, batches=2)
    assert chk["within_tolerance"], chk
    assert chk["loss_float32"] != chk["loss_bfloat16"]  # it did compute in bfloat16


def test_matmul_peak_is_measured():
    peak = peaks.measure_matmul_peak(jax.local_devices()[:2], "float32", repeats=2,
                                     sizes=((128, 64, 128),))
    assert peak["tflops"] > 0 and peak["devices"] == 2 and peak["source"] == "measured"


def test_bf16_matmul_peak_takes_bf16_operands_and_accumulates_in_float32():
    """The bfloat16 peak times the step's bfloat16 matmuls (bfloat16 operands, float32
    accumulation and output), not the slow bfloat16-output path of XLA:CPU."""
    a = jax.ShapeDtypeStruct((8, 4), jnp.bfloat16)
    b = jax.ShapeDtypeStruct((4, 2), jnp.bfloat16)
    assert jax.eval_shape(peaks.matmul("bfloat16"), a, b).dtype == jnp.float32
    hlo = jax.jit(peaks.matmul("bfloat16")).lower(a, b).as_text()
    assert "tensor<8x4xbf16>" in hlo and "-> tensor<8x2xf32>" in hlo, hlo
    f32 = jax.ShapeDtypeStruct((8, 4), jnp.float32)
    assert jax.eval_shape(peaks.matmul("float32"), f32, f32.update(shape=(4, 2))
                          ).dtype == jnp.float32
    peak = peaks.measure_matmul_peak(jax.local_devices()[:1], "bfloat16", repeats=1,
                                     sizes=((64, 32, 64),))
    assert peak["tflops"] > 0 and (peak["operands"], peak["accumulation"]) == (
        "bfloat16", "float32")


@pytest.mark.slow
def test_each_dtype_has_its_peak_and_the_report_says_which(monkeypatch):
    measured = []

    def fake_peak(devices, dtype, **_):
        measured.append(dtype)
        return {"tflops": {"float32": 0.01, "bfloat16": 0.03}[dtype], "source": "measured",
                "devices": len(devices), "operands": dtype,
                "accumulation": peaks.accumulation_dtype(dtype),
                "matmuls": [{"m": 8, "k": 8, "n": 8, "tflops": 0.01}]}
    monkeypatch.setattr(peaks, "measure_matmul_peak", fake_peak)
    bc = tiny(modes=["forward"], dtypes=["float32", "bfloat16"], torch_reference=False)
    rep = bench.run(bc, log=None)
    assert set(rep["peaks"]) == {"float32", "bfloat16"} and "bfloat16" in measured
    for r in rep["results"]:
        peak = rep["peaks"][r["dtype"]]["tflops"]
        assert r["utilisation"] == pytest.approx(r["achieved_tflops"] / peak)
        assert r["utilisation_peak"] == {"dtype": r["dtype"], "tflops": peak}
    md = report_lib.markdown(rep)
    assert ("Peak (bfloat16): 30 GFLOP/s over 4 device(s), measured matmuls of bfloat16 "
            "operands with float32 accumulation and output") in md
    assert "against the peak of the case's own dtype" in md


def test_minimum_step_bytes_by_hand():
    # training: 2 x (frozen + trainable) + 9 x trainable
    assert core.minimum_step_bytes(1000, 10) == 2 * 1010 + 90 == 2110
    # K = 4 runs: the backbone once, the trainable part 4 times
    assert core.minimum_step_bytes(1000, 10, runs=4) == 2 * (1000 + 40) + 9 * 40 == 2440
    # full fine-tuning: nothing frozen, 11 x the parameters
    assert core.minimum_step_bytes(0, 400) == 4400
    # forward only: every parameter read once
    assert core.minimum_step_bytes(1000, 10, training=False) == 1010
    with pytest.raises(ValueError, match="runs=2"):
        core.minimum_step_bytes(1000, 10, runs=2, training=False)
    # the trees' own itemsizes: a bfloat16 frozen leaf counts 2 bytes an element
    tree = {"w": jnp.zeros((3, 4), jnp.bfloat16), "b": np.zeros(5, np.float32)}
    assert jax_step._nbytes(tree) == 3 * 4 * 2 + 5 * 4


@pytest.mark.slow
def test_cases_report_bytes_accessed_against_the_minimum(report, tmp_path):
    """float32 parameters (4 bytes each): full fine-tuning 11 x 4 bytes a parameter, the
    frozen step 2 x 4 for every parameter + 9 x 4 for the trainable ones, forward 4."""
    rows = {r["mode"]: r for r in report["results"] if r["framework"] == "jax"}
    total = rows["full"]["total_params"]
    expected = {"full": 44 * total, "forward": 4 * total,
                "frozen": 8 * total + 36 * rows["frozen"]["trainable_params"]}
    for mode, r in rows.items():
        assert r["minimum_bytes_per_step_per_device"] == expected[mode], mode
        assert r["bytes_accessed_vs_minimum"] == pytest.approx(
            r["bytes_accessed_per_step_per_device"] / expected[mode])
    md = Path(bench.write(report, str(tmp_path), "min")["markdown"]).read_text()
    assert core.MINIMUM_BYTES_DEFINITION in md and "Activations" in md
    # in the main table and in the compiled-step table
    ratio = f"| {rows['full']['bytes_accessed_vs_minimum']:.2f}x |"
    main = next(ln for ln in md.splitlines() if ln.startswith("| tiny (4x6x3) | gpt2 | full |"))
    compiled = [ln for ln in md.splitlines() if ln.startswith("| tiny/full/float32 | ")
                and ratio in ln]
    assert ratio in main and len(compiled) == 1, md


def test_hlo_stats_counts_all_reduce_operands():
    hlo = """
  %dot.1 = f32[4,8]{1,0} dot(f32[4,3]{1,0} %a, f32[3,8]{1,0} %b), lhs_contracting_dims={1}
  %all-reduce.2 = (f32[], f32[16,3]{1,0}, f32[7]{0}) all-reduce(f32[] %x, f32[16,3]{1,0} %y, f32[7]{0} %z), replica_groups={}
  %ars = f32[5]{0} all-reduce-start(f32[5]{0} %w), replica_groups={}
  %ard = f32[5]{0} all-reduce-done(f32[5]{0} %ars)
"""
    h = jax_step.hlo_stats(hlo)
    assert h == {"dot_ops": 1, "all_reduce_ops": 2, "all_reduce_elements": 1 + 48 + 7 + 5,
                 "all_reduce_scalars": 1}


def test_bad_settings_are_errors_that_say_what_is_accepted():
    with pytest.raises(ValueError, match="unknown mode 'sideways'; accepted: frozen, full, "):
        tiny(modes=["sideways"])
    with pytest.raises(ValueError, match="unknown dtype 'float16'; accepted: float32, "):
        tiny(dtypes=["float16"])
    for bad in ([0], [2, -1], [], [1.5], ["four"]):
        with pytest.raises(ValueError, match="sweeps=.*accepted: integers >= 1"):
            tiny(sweeps=bad)
    with pytest.raises(ValueError, match="fewer than rounds"):
        tiny(steps=1, rounds=2)
    with pytest.raises(ValueError, match="remats=maybe: 'maybe' is not a boolean"):
        tiny(remats=["maybe"])
    with pytest.raises(ValueError, match="shape 'flat': synthetic: classes=1"):
        bench.Shape("flat", 4, 4, 2, 1)
    # the settings as the command line gives them: comma-separated strings, normalised
    s = bench.BenchConfig(shapes=("bit_xor,cifar10",), remats=("false,true",),
                          sweeps=("1,4",), modes=("frozen, full",)).validate()
    assert (s.shapes, s.remats, s.sweeps, s.modes) == (
        ("bit_xor", "cifar10"), (False, True), (1, 4), ("frozen", "full"))
    # any selection training accepts is a mode; 'frozen' is the base config's selection
    bc = tiny(base=dataclasses.replace(BASE, trainable="fpt,mlp"), modes=["frozen", "forward"],
              selections="output,attn[-1:]")
    assert [c.mode for c in bc.cases(SHAPE)] == ["fpt,mlp", "forward", "output,attn[-1:]"]
    with pytest.raises(ValueError, match=r"--bench.selections=attn\[3\]: 'attn\[3\]': .*out "
                                         "of range.*; accepted: trainable selections"):
        tiny(selections="attn[3]")
    with pytest.raises(ValueError, match="batch_size=6 is not divisible"):
        jax_step.JaxRunner(TINY, bench.Case(bench.Shape("odd", 6, 4, 2, 2), "fpt"))


def test_sweeps_default_to_the_base_config():
    bc = bench.Bench(dataclasses.replace(BASE, dtype="bfloat16", remat=True),
                     bench.BenchConfig(modes=["full"]))
    assert (bc.dtypes, bc.remats) == (("bfloat16",), (True,))
    (case,) = bc.cases(SHAPE)
    cfg = bc.train_config(case)
    assert (cfg.task, cfg.init, cfg.batch_size, cfg.trainable, cfg.dtype, cfg.remat) == (
        "synthetic", "random", SHAPE.batch_size, "full", "bfloat16", True)
    # pretrained is the config's default: the benchmark initialises at random regardless
    assert bench.Bench(dataclasses.replace(BASE, init="pretrained")).backbone().n_layer == 1


def test_scaling_plot_and_table(tmp_path):
    def row(framework, mode, t, tps):
        return {"framework": framework, "mode": mode, "dtype": "float32", "remat": False,
                "shape": {"name": f"seq{t}", "seq_len": t, "batch_size": 1},
                "tokens_per_s": tps}
    report = {"results": [row("jax", "frozen", 64, 100.0), row("jax", "frozen", 128, 150.0),
                          row("torch", "frozen", 64, 40.0), row("torch", "frozen", 128, 50.0)],
              "scaling_shapes": ["seq64", "seq128"], "config": {"base": {"model": "gpt2"}},
              "model": {"n_layer": 2, "n_embd": 16},
              "environment": {"device_kind": "cpu", "global_devices": 4}}
    series = report_lib.scaling_series(report)
    assert series == {"fpt-jax frozen": [(64, 100.0), (128, 150.0)],
                      "PyTorch frozen": [(64, 40.0), (128, 50.0)]}
    assert "| fpt-jax frozen | 100 | 150 |" in report_lib.scaling_table(report)
    report_lib.plot_scaling(report, str(tmp_path / "scaling.png"))
    assert (tmp_path / "scaling.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_compile_only_reports_memory_without_running(tmp_path):
    # Two blocks: the last one, computed only where the head reads, is never rematted.
    bc = tiny(base=dataclasses.replace(BASE, n_layer=2), modes=["frozen"],
              remats=[False, True], compile_only=True)
    report = bench.run(bc, log=None)
    rows = report["results"]
    assert [r["remat"] for r in rows] == [False, True]
    for r in rows:
        assert r["step_ms"] is None and r["skipped"] == "compile only"
        assert r["flops_per_step"] > 0 and r["memory_per_device"]["temp"] > 0
    # recomputing each block's forward pass costs FLOPs
    assert rows[1]["flops_per_step"] > rows[0]["flops_per_step"]
    md = open(bench.write(report, str(tmp_path), "co")["markdown"]).read()
    assert "compile only" in md


def test_a_step_that_does_not_fit_is_not_run(monkeypatch):
    memory = {"output": 10, "alias": 10, "temp": 2**30}
    monkeypatch.setattr(jax_step, "host_available_bytes", lambda: 2**31)
    assert jax_step.fits_on_host(memory, 1, 0.8) == (True, "")
    fits, why = jax_step.fits_on_host(memory, 2, 0.8)
    assert not fits and "does not fit" in why and "2.0 GiB" in why


def test_synthetic_is_a_registered_task():
    assert "synthetic" in tasks.task_names()
    task = tasks.get_task("synthetic", seq_len=5, features=3, classes=4)
    assert (task.input_dim, task.output_dim, task.example_shape) == (3, 4, (5, 3))
    whole = task.batch("train", 7, 4, seed=1)
    assert whole["x"].shape == (4, 5, 3) and whole["y"].max() < 4
    # host 1 of 2 gets rows 2..3 of the same global batch
    half = task.batch("train", 7, 2, seed=1, process_index=1, process_count=2)
    np.testing.assert_array_equal(half["x"], whole["x"][2:])
    with pytest.raises(ValueError, match="takes no setting patch_size"):
        tasks.get_task("synthetic", patch_size=2)


def _benchmark(*args, tmp_path):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
           "JAX_PLATFORMS": "cpu", "FPT_JAX_HUGEPAGES": "0"}
    return subprocess.run([sys.executable, "-m", "experiments.benchmark", *args,
                           f"--out_dir={tmp_path}", "--name=cli"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_cli_takes_the_training_config_and_the_bench_settings(tmp_path):
    done = _benchmark("--config.init=random", "--config.n_layer=1", "--config.n_head=2",
                      "--config.n_embd=16", "--config.dropout=0", "--config.trainable=output,ln",
                      "--bench.shapes=bit_xor", "--bench.modes=frozen", "--bench.steps=1",
                      "--bench.rounds=1", "--bench.warmup=0", "--bench.torch_reference=false",
                      "--bench.peak_tflops=1", tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    data = json.loads((tmp_path / "cli.json").read_text())
    base = data["config"]["base"]
    assert (base["n_layer"], base["n_embd"], base["dropout"], base["trainable"]) == (
        1, 16, 0.0, "output,ln")
    settings = data["config"]["bench"]
    assert (settings["shapes"], settings["modes"], settings["steps"], settings["rounds"],
            settings["warmup"], settings["torch_reference"], settings["peak_tflops"]) == (
        ["bit_xor"], ["frozen"], 1, 1, 0, False, 1.0)
    assert data["model"] == {"family": "gpt2", "n_layer": 1, "n_head": 2, "n_embd": 16}
    (row,) = data["results"]
    assert row["trainable"] == "output,ln" and row["step_ms"]["n"] == 1
    assert "--config.trainable=output,ln" in data["command"]
    assert (tmp_path / "cli.md").exists()
    assert "wrote " + str(tmp_path / "cli.json") in done.stdout


# --- every setting from the command line ----------------------------------------------

BENCH_ARGS = ("--config.init=random", "--config.n_layer=1", "--config.n_head=2",
              "--config.n_embd=16")


def _parsed(*args: str) -> bench.Bench:
    """The Bench the benchmark runs with, from `--bench...` flags parsed as the entry point
    parses them (its own settings and parser, a fresh set of flags)."""
    argv = ["benchmark", *BENCH_ARGS, *args]
    fv = flags.FlagValues()
    assert cli.settings_parser(benchmark_cli.SETTINGS)(argv, fv) == ["benchmark"]
    return bench.Bench(fv["config"].value, fv["bench"].value)


def _names(b: bench.Bench) -> list[str]:
    return [s.name for s in b.shapes]


SEQ8 = ("--bench.seq_lens=8",)
# field: (command-line value, the value it parses to, other flags, what the Bench holds)
OVERRIDES = {
    "shapes": ("cifar10", ("cifar10",), (), lambda b: _names(b) == ["cifar10"]),
    "seq_lens": ("8,16", (8, 16), (), lambda b: _names(b) == ["seq8", "seq16"]),
    "batch_size": ("2", 2, SEQ8, lambda b: b.shapes[0].batch_size == 2),
    "features": ("3", 3, SEQ8, lambda b: b.shapes[0].features == 3),
    "classes": ("5", 5, SEQ8, lambda b: b.shapes[0].classes == 5),
    "modes": ("frozen,forward", ("frozen", "forward"), (),
              lambda b: [c.mode for c in b.cases(b.shapes[0])] == ["frozen", "forward"]),
    "selections": ("output,ln|output", "output,ln|output", ("--bench.modes=forward",),
                   lambda b: b.modes == ("forward", "output,ln", "output")),
    "dtypes": ("float32,bfloat16", ("float32", "bfloat16"), (),
               lambda b: b.dtypes == ("float32", "bfloat16")),
    "remats": ("false,true", (False, True), (), lambda b: b.remats == (False, True)),
    "sweeps": ("1,4", (1, 4), (), lambda b: b.sweeps == (1, 4)),
    "baselines": ("lstm,fnet", ("lstm", "fnet"), (),
                  lambda b: [c.model for c in b.cases(b.shapes[0]) if c.model]
                  == ["lstm", "fnet"]),
    "steps": ("7", 7, (), None), "warmup": ("0", 0, (), None), "rounds": ("4", 4, (), None),
    "switch_steps": ("0", 0, (), None), "torch_reference": ("false", False, (), None),
    "torch_threads": ("2", 2, (), None), "torch_attn": ("eager", "eager", (), None),
    "peak_tflops": ("1.5", 1.5, (), None), "compile_only": ("true", True, (), None),
    "memory_fraction": ("0.9", 0.9, (), None),
    "plot": ("yes", "yes", (), lambda b: b.settings.plot_choice() is True),
}


def test_every_bench_setting_has_a_command_line_case():
    assert set(OVERRIDES) == {f.name for f in dataclasses.fields(bench.BenchConfig)}


@pytest.mark.parametrize("field", dataclasses.fields(bench.BenchConfig), ids=lambda f: f.name)
def test_every_bench_setting_is_overridden_from_the_command_line(field):
    text, value, others, holds = OVERRIDES[field.name]
    default = _parsed().settings
    assert getattr(default, field.name) != value
    b = _parsed(*others, f"--bench.{field.name}={text}")
    assert getattr(b.settings, field.name) == value
    assert holds is None or holds(b), field.name
    # nothing else changed: every other field as the defaults (or the other flags) have it
    given = {a.partition("=")[0].removeprefix("--bench.") for a in others}
    for f in dataclasses.fields(bench.BenchConfig):
        if f.name != field.name and f.name not in given:
            assert getattr(b.settings, f.name) == getattr(default, f.name), f.name


def test_a_bench_setting_that_is_not_a_field_is_an_error(capsys):
    with pytest.raises(SystemExit) as info:
        _parsed("--bench.shape=bit_xor")
    assert info.value.code == 2
    assert ("error: --bench.shape: not a setting; accepted: --bench.<field> for the fields "
            "shapes, seq_lens,") in capsys.readouterr().err


def test_the_benchmark_judges_its_config_at_random_init():
    # the step timed is always at random init: resizing the preset needs no init=random
    from absl import flags as absl_flags
    from experiments import benchmark, cli
    fv = absl_flags.FlagValues()
    argv = ["x", "--config.n_layer=1", "--config.n_head=2", "--config.n_embd=32"]
    cli.settings_parser(benchmark.SETTINGS, as_run=benchmark.timed_config)(argv, fv)
    assert (fv.config.init, fv.config.n_layer) == ("pretrained", 1)
    with pytest.raises(SystemExit):  # train judges it as it runs: pretrained, resized
        cli.settings_parser()(argv, absl_flags.FlagValues())
