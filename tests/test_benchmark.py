"""The benchmark: it runs and writes its report; the step it times is the training step,
donating its state, all-reducing only trainable gradients; remat and bf16 are faithful.

Runs under the root conftest's 4 forced CPU devices, on a tiny GPT-2.
"""
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fpt_jax import bench, parallel, train

# One block and no dropout keep XLA's CPU compiles (the bulk of these tests' time) short.
TINY = bench.BenchConfig(n_layer=1, n_head=2, n_embd=16, dropout=0.0, warmup=2, steps=2,
                         rounds=2, torch_threads=2)
SHAPE = bench.Shape("tiny", batch_size=4, seq_len=6, features=3, classes=5)


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
    # A peak from the flag keeps the test from timing large matmuls; the measured peak has
    # its own test below.
    bc = bench.BenchConfig(**{**TINY.__dict__, "peak_tflops": 0.05})
    return bench.run(bc, [SHAPE], ["frozen", "full", "forward"], command="pytest",
                     log=None)


def test_report_is_written_as_json_and_markdown(report, tmp_path):
    paths = bench.write(report, str(tmp_path), "tiny")
    data = json.loads(open(paths["json"]).read())
    assert data["command"] == "pytest"
    env = data["environment"]
    assert env["backend"] == "cpu" and env["local_devices"] == 4
    assert env["versions"]["jax"] == jax.__version__
    jax_rows = [r for r in data["results"] if r["framework"] == "jax"]
    assert {r["mode"] for r in jax_rows} == {"frozen", "full", "forward"}
    for r in jax_rows:
        assert r["step_ms"]["n"] == TINY.steps and r["step_ms"]["median"] > 0
        assert r["tokens_per_s"] == pytest.approx(SHAPE.tokens * r["steps_per_s"])
        assert r["tokens_per_s_per_device"] == pytest.approx(r["tokens_per_s"] / 4)
        assert r["compile_s"] > 0 and r["achieved_tflops"] > 0 and r["utilisation"] > 0
        assert r["memory_per_device"]["peak_estimate"] > 0
        assert r["bytes_accessed_per_step_per_device"] > 0
    md = open(paths["markdown"]).read()
    assert "`pytest`" in md and f"jax {jax.__version__}" in md
    tables = [ln for ln in md.splitlines() if ln.startswith("|")]
    assert tables, md
    # every row of a table has as many cells as its header
    block = []
    for ln in md.splitlines() + [""]:
        if ln.startswith("|"):
            block.append(ln.count("|"))
        elif block:
            assert len(set(block)) == 1, md
            block = []
    assert "png" not in paths  # one sequence length: no scaling plot


def test_flops_positive_and_full_costs_more_than_frozen(report):
    by_mode = {r["mode"]: r for r in report["results"] if r["framework"] == "jax"}
    flops = {m: r["flops_per_step"] for m, r in by_mode.items()}
    assert all(f > 0 for f in flops.values()), flops
    assert flops["forward"] < flops["frozen"] < flops["full"], flops
    # frozen attention/MLP weights: no weight-gradient matmuls in the compiled step
    dots = {m: r["hlo"]["dot_ops"] for m, r in by_mode.items()}
    assert dots["frozen"] < dots["full"], dots


def test_frozen_step_all_reduces_exactly_the_trainable_gradients(report):
    for r in report["results"]:
        if r["framework"] != "jax" or r["mode"] == "forward":
            continue
        h = r["hlo"]
        assert h["all_reduce_ops"] >= 1
        # the metric scalars (loss, accuracy) also cross devices
        assert h["all_reduce_scalars"] == 2, h
        assert h["all_reduce_elements"] - h["all_reduce_scalars"] == r["trainable_params"], (
            r["mode"], h, r["trainable_params"])
    frozen = next(r for r in report["results"] if r["mode"] == "frozen")
    full = next(r for r in report["results"] if r["mode"] == "full")
    assert frozen["trainable_params"] < full["trainable_params"] == full["total_params"]


def test_torch_reference_is_interleaved_and_compared(report):
    if not bench.torch_available():
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
    w, rows = TINY.n_embd, SHAPE.tokens
    assert [(r["m"], r["k"], r["n"]) for r in cmp["sizes"]] == [(rows, w, 4 * w),
                                                                (rows, 4 * w, w)]
    for r in cmp["sizes"]:
        assert r["xla_tflops"] > 0 and r["torch_tflops"] > 0
        assert r["ratio"] == pytest.approx(r["xla_tflops"] / r["torch_tflops"])


def test_train_step_donates_its_state(report):
    for r in report["results"]:
        if r["framework"] == "jax":
            assert r["state_donated"] is (r["mode"] != "forward" or None), r["case"]
    r = bench.JaxRunner(TINY, bench.Case(SHAPE, "frozen"))
    before = r.carry
    r.run_step()
    leaves = jax.tree_util.tree_leaves(before)
    assert leaves and all(x.is_deleted() for x in leaves)
    assert not any(x.is_deleted() for x in jax.tree_util.tree_leaves(r.carry))


def test_remat_gives_the_same_loss_and_gradients():
    task = bench.SyntheticTask(SHAPE.seq_len, SHAPE.features, SHAPE.classes)
    batch = task.batch("train", 0, 4, seed=0)
    rng = jax.random.PRNGKey(3)
    # Two blocks: the last one, computed only where the head reads, is never rematted.
    cfg = train.TrainConfig(task="synthetic", init="random", n_layer=2, n_head=2, n_embd=16,
                            trainable="full", dropout=0.1)
    s = train.setup(cfg, task)
    out = {}
    for remat in (False, True):
        model = train.make_model(dataclasses.replace(cfg, remat=remat), task, s.config)
        assert model.remat is remat

        def loss(params, model=model):
            logits = model.apply({"params": params}, batch["x"], deterministic=False,
                                 rngs={"dropout": rng})
            return task.per_example_metrics(logits, batch)["loss"].mean()
        out[remat] = jax.jit(jax.value_and_grad(loss))(s.state.params)
    (l0, g0), (l1, g1) = out[False], out[True]
    np.testing.assert_allclose(l0, l1, rtol=1e-6)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5,
                                                                  atol=1e-7), g0, g1)


def test_remat_reduces_compiled_peak_memory():
    """Per-block remat must keep only the block inputs across the forward pass plus one
    block's activations: the compiled frozen train step (pmapped, state donated, dropout
    on) needs well under half the temporaries of the step without remat. With `nn.remat`
    on XLA:CPU it did not: the recomputation ran in the forward pass (see gpt2._remat)."""
    bc = bench.BenchConfig(n_layer=4, n_head=2, n_embd=64, dropout=0.1, num_devices=1,
                           torch_reference=False)
    shape = bench.Shape("long", batch_size=1, seq_len=256, features=4, classes=5)
    temp, dots = {}, {}
    for remat in (False, True):
        r = bench.JaxRunner(bc, bench.Case(shape, "frozen", "float32", remat))
        r.compile()
        temp[remat], dots[remat] = r.memory["temp"], r.hlo["dot_ops"]
    assert dots[True] > dots[False], dots  # it does recompute
    assert temp[True] <= 0.5 * temp[False], temp


def test_bf16_loss_within_stated_tolerance():
    chk = bench.dtype_loss_check(TINY, SHAPE, batches=2)
    assert chk["within_tolerance"], chk
    assert chk["loss_float32"] != chk["loss_bfloat16"]  # it did compute in bfloat16


def test_matmul_peak_is_measured():
    peak = bench.measure_matmul_peak(jax.local_devices()[:2], "float32", repeats=2,
                                     sizes=((128, 64, 128),))
    assert peak["tflops"] > 0 and peak["devices"] == 2 and peak["source"] == "measured"


def test_hlo_stats_counts_all_reduce_operands():
    hlo = """
  %dot.1 = f32[4,8]{1,0} dot(f32[4,3]{1,0} %a, f32[3,8]{1,0} %b), lhs_contracting_dims={1}
  %all-reduce.2 = (f32[], f32[16,3]{1,0}, f32[7]{0}) all-reduce(f32[] %x, f32[16,3]{1,0} %y, f32[7]{0} %z), replica_groups={}
  %ars = f32[5]{0} all-reduce-start(f32[5]{0} %w), replica_groups={}
  %ard = f32[5]{0} all-reduce-done(f32[5]{0} %ars)
"""
    h = bench.hlo_stats(hlo)
    assert h == {"dot_ops": 1, "all_reduce_ops": 2, "all_reduce_elements": 1 + 48 + 7 + 5,
                 "all_reduce_scalars": 1}


def test_unknown_mode_and_bad_batch_are_errors():
    with pytest.raises(ValueError, match="unknown mode 'sideways'"):
        bench.validate_mode("sideways", 2)
    bench.validate_mode("output,attn[-1:]", 2)  # any selection training accepts
    with pytest.raises(ValueError, match="batch_size=6 is not divisible"):
        bench.JaxRunner(TINY, bench.Case(bench.Shape("odd", 6, 4, 2, 2), "frozen"))


def test_scaling_plot_and_table(tmp_path):
    def row(framework, mode, t, tps):
        return {"framework": framework, "mode": mode, "dtype": "float32", "remat": False,
                "shape": {"name": f"seq{t}", "seq_len": t, "batch_size": 1},
                "tokens_per_s": tps}
    report = {"results": [row("jax", "frozen", 64, 100.0), row("jax", "frozen", 128, 150.0),
                          row("torch", "frozen", 64, 40.0), row("torch", "frozen", 128, 50.0)],
              "scaling_shapes": ["seq64", "seq128"], "config": {"model": "gpt2"},
              "model": {"n_layer": 2, "n_embd": 16},
              "environment": {"device_kind": "cpu", "global_devices": 4}}
    series = bench.scaling_series(report)
    assert series == {"fpt-jax frozen": [(64, 100.0), (128, 150.0)],
                      "PyTorch frozen": [(64, 40.0), (128, 50.0)]}
    assert "| fpt-jax frozen | 100 | 150 |" in bench.scaling_table(report)
    bench.plot_scaling(report, str(tmp_path / "scaling.png"))
    assert (tmp_path / "scaling.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compile_only_reports_memory_without_running(tmp_path):
    # Two blocks: the last one, computed only where the head reads, is never rematted.
    bc = bench.BenchConfig(**{**TINY.__dict__, "compile_only": True, "n_layer": 2})
    report = bench.run(bc, [SHAPE], ["frozen"], remats=(False, True), log=None)
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
    monkeypatch.setattr(bench, "host_available_bytes", lambda: 2**31)
    assert bench.fits_on_host(memory, 1, 0.8) == (True, "")
    fits, why = bench.fits_on_host(memory, 2, 0.8)
    assert not fits and "does not fit" in why and "2.0 GiB" in why
