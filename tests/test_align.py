"""The alignment stage (ORCA; fpt_jax/align.py) and its distances (fpt_jax/distances.py):
MMD equals a numpy reference, OTDD behaves as a distance, the source text is read and
embedded with the checkpoint's own tokenizer and table, alignment lowers the held-out
distance and resumes exactly, and with align_steps=0 a run is what it was before."""
import dataclasses
import json

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fpt_jax import align, build, distances, loop, source_text
from tests.settings import train_config

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

WORDS = {"alpha": ["ant", "ape", "asp", "auk"], "beta": ["bee", "bat", "boa", "bug"],
         "gamma": ["gnu", "gar", "gull", "goat"]}


def _mmd2_reference(x, y, bandwidths, unbiased):
    def k(a, b):
        return sum(np.exp(-np.sum((a - b) ** 2) / (2 * s * s)) for s in bandwidths)
    n, m = len(x), len(y)
    kxx = [k(x[i], x[j]) for i in range(n) for j in range(n) if not unbiased or i != j]
    kyy = [k(y[i], y[j]) for i in range(m) for j in range(m) if not unbiased or i != j]
    kxy = [k(x[i], y[j]) for i in range(n) for j in range(m)]
    return np.mean(kxx) + np.mean(kyy) - 2 * np.mean(kxy)


@pytest.mark.parametrize("unbiased", [True, False])
def test_mmd_equals_a_numpy_reference(unbiased):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(9, 5)), rng.normal(0.5, 1.3, size=(7, 5))
    bandwidths = distances.median_bandwidths(y)
    got = float(distances.mmd2(jnp.asarray(x), jnp.asarray(y), bandwidths, unbiased))
    np.testing.assert_allclose(got, _mmd2_reference(x, y, bandwidths, unbiased), rtol=2e-5,
                               atol=1e-6)
    assert got > 0.05  # two different distributions


@pytest.mark.slow
def test_otdd_is_zero_between_a_set_and_itself_and_grows_with_a_shift():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(12, 4)).astype(np.float32)
    labels = np.arange(12) % 3
    # value and gradient compiled once for every call (ott's solver compiles slowly)
    otdd = jax.jit(jax.value_and_grad(distances.otdd, argnums=3), static_argnums=(2, 5))
    d = lambda y, y_labels: float(otdd(x, labels, 3, y, y_labels, 3)[0])  # noqa: E731
    assert abs(d(x, labels)) < 1e-3
    near, far = d(x + 0.3, labels), d(x + 2.0, labels)
    assert 1e-3 < near < far
    # only the classes' point clouds count, not what they are called
    assert abs(d(x, (labels + 1) % 3)) < 1e-3
    assert d(x, np.zeros(12, int)) > 1e-2  # one class where there were three
    # differentiable through ott's solver, zero-weight classes and all
    grad = otdd(x, labels, 3, x + 0.3, labels, 3)[1]
    assert np.all(np.isfinite(grad)) and np.abs(grad).max() > 0


def _corpus(tmp_path):
    rng = np.random.default_rng(0)
    directory = tmp_path / "corpus"
    directory.mkdir()
    for name, words in WORDS.items():
        docs = [" ".join(rng.choice(words, 8)) for _ in range(15)]
        separator = "\n%\n" if name != "gamma" else "\n\n"  # the fortune format, or paragraphs
        (directory / name).write_text(separator.join(docs) + "\n")
    (directory / "alpha.dat").write_bytes(b"\x00\x01index")  # a fortune index: skipped
    return directory


def _checkpoint(tmp_path):
    """A small random BERT with a word-level tokenizer over the corpus's words."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    vocab = {w: i for i, w in enumerate(["[UNK]", *sorted(sum(WORDS.values(), []))])}
    hf = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=64, max_position_embeddings=64,
                                 vocab_size=len(vocab))
    directory = tmp_path / "bert"
    transformers.BertModel(hf).save_pretrained(directory, safe_serialization=True)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(directory / "tokenizer.json"))
    return directory, vocab


def test_the_corpus_is_read_by_class_and_embedded_by_the_checkpoints_own_table(tmp_path):
    corpus = source_text.read_corpus(_corpus(tmp_path))
    assert corpus.classes == ("alpha", "beta", "gamma") and len(corpus.texts) == 45
    assert np.array_equal(np.bincount(corpus.labels), [15, 15, 15])
    assert all(set(t.split()) <= set(WORDS[corpus.classes[c]])
               for t, c in zip(corpus.texts, corpus.labels))
    directory, vocab = _checkpoint(tmp_path)
    table = source_text.word_embeddings(directory)
    features = source_text.text_features(corpus.texts[:3], directory)
    want = table[[vocab[w] for w in corpus.texts[0].split()]].mean(0)
    np.testing.assert_allclose(features[0], want, rtol=1e-6)
    assert source_text.largest_classes(corpus, 2).classes == ("alpha", "beta")
    with pytest.raises(ValueError, match="no such directory"):
        source_text.read_corpus(tmp_path / "missing")


def _aligning(tmp_path, **settings):
    directory, _ = _checkpoint(tmp_path)
    return train_config(**{**dict(
        task="bit_xor", model="auto", weights=str(directory), batch_size=8,
        align_corpus=str(_corpus(tmp_path)), align_batch_size=16, align_steps=12,
        align_learning_rate=1e-2, log_every=4, checkpoint_every=4, eval_every=1000,
        eval_batches=2), **settings})


@pytest.mark.slow
def test_alignment_lowers_the_held_out_distance_and_resumes_exactly(tmp_path):
    cfg = _aligning(tmp_path)
    g = build.build_group(cfg, learning_rates=(1e-3, 1e-3), seeds=(0, 1))
    before = flax.traverse_util.flatten_dict(g.states.trainable)
    assert align.align_group(g, str(tmp_path / "whole"), lambda: False) == 12
    after = flax.traverse_util.flatten_dict(g.states.trainable)
    assert any(not np.array_equal(before[k], after[k]) for k in before if k[0] == "input")
    assert all(np.array_equal(before[k], after[k]) for k in before if k[0] != "input")
    records = [json.loads(line) for line in open(tmp_path / "whole" / align.METRICS)]
    assert [r["step"] for r in records if r["run"] == 0] == [0, 4, 8, 12]
    for run in align.summary(str(tmp_path / "whole"), 2):
        assert run["align/held_out_after"] < 0.8 * run["align/held_out_before"]

    # stopped after step 5 (a checkpoint written), then resumed from it: the same layers
    calls = iter(range(100))
    g2 = build.build_group(cfg, learning_rates=(1e-3, 1e-3), seeds=(0, 1))
    assert align.align_group(g2, str(tmp_path / "cut"), lambda: next(calls) == 4) == 5
    g3 = build.build_group(cfg, learning_rates=(1e-3, 1e-3), seeds=(0, 1))
    assert align.align_group(g3, str(tmp_path / "cut"), lambda: False) == 12
    resumed = flax.traverse_util.flatten_dict(g3.states.trainable)
    assert all(np.array_equal(after[k], resumed[k]) for k in after)
    cut = [json.loads(line) for line in open(tmp_path / "cut" / align.METRICS)]
    assert [r for r in cut if r["step"] % 4 == 0] == records  # one uninterrupted curve


@pytest.mark.slow
def test_a_run_aligns_then_trains_and_records_both_distances(tmp_path):
    cfg = _aligning(tmp_path, steps=3)
    out = loop.train_and_evaluate(cfg, str(tmp_path / "run"))[0]["final"]
    assert out["align/held_out_after"] < out["align/held_out_before"]
    assert "train/loss" in out
    # resumed after the training stage's checkpoint: no second alignment
    mtime = (tmp_path / "run" / align.METRICS).stat().st_mtime_ns
    cfg2 = dataclasses.replace(cfg, steps=4)
    loop.train_and_evaluate(cfg2, str(tmp_path / "run"))
    assert (tmp_path / "run" / align.METRICS).stat().st_mtime_ns == mtime


@pytest.mark.slow
def test_without_alignment_a_run_is_bit_identical_whatever_the_align_settings(tmp_path):
    tiny = dict(task="bit_xor", init="random", n_layer=1, n_head=2, n_embd=16, batch_size=8,
                steps=3, eval_every=1000, eval_batches=2, log_every=1)
    plain = loop.train_and_evaluate(train_config(**tiny), str(tmp_path / "a"))
    other = loop.train_and_evaluate(train_config(
        **tiny, align_distance="otdd", align_learning_rate=0.5, align_batch_size=4,
        align_corpus=str(tmp_path)), str(tmp_path / "b"))
    assert plain[0]["final"] == other[0]["final"]
    a, pa = build.load_run(str(tmp_path / "a"), which="last")
    b, pb = build.load_run(str(tmp_path / "b"), which="last")
    fa, fb = (flax.traverse_util.flatten_dict(p) for p in (pa, pb))
    assert all(np.array_equal(fa[k], fb[k]) for k in fa)
    assert not (tmp_path / "a" / align.METRICS).exists()


@pytest.mark.parametrize("settings, message", [
    (dict(init="random", model="minilm-l6"), "init='random' has none"),
    (dict(trainable="output,ln"), "which trainable='output,ln' freezes; add 'input'"),
    (dict(align_corpus="/no/such/dir"), "align_corpus=/no/such/dir: no such directory"),
    (dict(align_distance="wasserstein"), "unknown align_distance"),
    (dict(align_steps=-1), "align_steps=-1"),
    (dict(align_batch_size=1), "align_batch_size=1"),
    (dict(blocks=5), r"blocks=5; accepted: a tuple of integers >= 0, e.g. \(5,\)"),
])
def test_bad_alignment_settings_are_rejected_before_anything_is_built(settings, message):
    base = dict(task="bit_xor", model="minilm-l6", weights="minilm", align_steps=10)
    with pytest.raises(ValueError, match=message):
        train_config(**{**base, **settings}).check()


def test_otdd_on_a_task_without_one_class_per_example_stops_before_the_first_step(tmp_path):
    cfg = _aligning(tmp_path, align_distance="otdd", steps=3)
    with pytest.raises(ValueError, match="align_distance=otdd needs one class label"):
        loop.train_and_evaluate(cfg, str(tmp_path / "run"))
    assert not (tmp_path / "run" / "checkpoints").exists() or not any(
        (tmp_path / "run" / "checkpoints").iterdir())


def test_the_report_shows_each_seeds_held_out_distance_before_and_after(tmp_path):
    import types
    from fpt_jax import align_report
    cfg = train_config(task="bit_xor", model="minilm-l6", weights="minilm", align_steps=8)
    lines = [{"step": s, "run": r, "align/held_out_distance": d}
             for r, ds in ((0, (2.0, 1.0, 0.5)), (2, (4.0, 2.0, 1.0)))
             for s, d in zip((0, 4, 8), ds)]
    (tmp_path / align.METRICS).write_text("".join(json.dumps(x) + "\n" for x in lines))
    finals = [{"align/held_out_before": 2.0, "align/held_out_after": 0.5}, {},
              {"align/held_out_before": 4.0, "align/held_out_after": 1.0}]
    cell = types.SimpleNamespace(runs=[{"seed": i, "final": f} for i, f in enumerate(finals)],
                                 path=tmp_path)
    row = types.SimpleNamespace(task="bit_xor", row="minilm_aligned", cfg=cfg, selection=None,
                                cell=cell, picked=types.SimpleNamespace(run_ids=[0, 2]))
    table = align_report.table([row])
    assert table[-1].split(" | ")[3:] == ["2", "3.0000 +- 1.0000", "0.7500 +- 0.2500",
                                          "0.2500 +- 0.0000 |"]
    assert align_report.curves(tmp_path, [0, 2])[2] == ([0, 4, 8], [4.0, 2.0, 1.0])
    assert align_report.plot([row], tmp_path / "align.png")
    assert (tmp_path / "align.png").stat().st_size > 0
    unaligned = types.SimpleNamespace(**{**vars(row), "cfg": train_config(task="bit_xor")})
    assert align_report.aligned([unaligned]) == []


def test_a_cell_recorded_before_the_new_settings_is_continued_not_refused():
    from fpt_jax import runs, sweep
    current = train_config(task="bit_xor").to_dict()
    recorded = {k: v for k, v in current.items() if k not in runs.ADDED_FIELDS}
    assert sweep._differing(recorded, current) == []
    assert sweep._differing(recorded, {**current, "align_steps": 5}) == ["align_steps"]
    # a stage that does not run: its settings change nothing, name no other cell
    idle = {**current, "align_learning_rate": 0.5, "blocks_init": "random"}
    assert sweep._differing(recorded, idle) == []
    assert runs.active(idle) == runs.active(current)


def test_alignment_with_a_batch_larger_than_the_corpus_is_refused(tmp_path):
    cfg = _aligning(tmp_path, align_batch_size=64)  # 3 x 15 documents, 10% held out
    g = build.build_group(cfg)
    with pytest.raises(ValueError, match="align_batch_size=64: the corpus .* has 41 training"):
        align.align_group(g, str(tmp_path / "run"), lambda: False)
