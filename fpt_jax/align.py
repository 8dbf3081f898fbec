"""Align, then refine (ORCA, Shen et al. 2023): before training, the new input layer is
trained alone so that the task's examples, as it embeds them, are distributed like the
pretrained backbone's own input of its source modality: real text (`fpt_jax.source_text`)
embedded by the checkpoint's word-embedding table.

One example is one vector on either side: a document's mean word-embedding row, a task
example's mean input-layer output over its positions (its real ones, for padded token
sequences). The loss is the distance between a batch of each (`fpt_jax.distances`): MMD
with Gaussian kernels at 5 bandwidths fixed from the source, or the OTDD with labels on both
sides (the task's classes; the corpus's 10 largest classes).

The stage runs every run of the group at once (vmapped over the run axis, Adam on each run's
`input` subtree, no dropout), `align_steps` steps, each run its own data order; every
`log_every` steps WORKDIR/align_metrics.jsonl gets the mean training distance and the
distance on held-out data (validation examples against held-out documents, the same for
every run), step 0 being before any update. It checkpoints into WORKDIR/align_checkpoints
(resume is exact: the data of step s depends on the run's seed and s only) and is skipped
once the training stage has a checkpoint. Then training goes on as configured, from the
aligned input layer (its optimizer state fresh).
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from fpt_jax import build, distances, parallel, runs, source_text
from fpt_jax.checkpoint import Checkpoints
from fpt_jax.guard import DivergenceError, check_finite_state
from fpt_jax.metrics import MetricWriter
from fpt_jax.steps import stack_runs

CHECKPOINTS = "align_checkpoints"
METRICS = "align_metrics.jsonl"
OTDD_CLASSES = 10  # the corpus's largest classes the OTDD reads
MAX_OTDD_CLASSES = 40  # both sides' classes together: (40^2 transport problems a step)
HELD_OUT_FRACTION = 0.1
HELD_OUT_BATCHES = 2  # validation batches (of align_batch_size) in it
_SOURCE_STREAM = 7_919  # apart from the training stage's data order


@dataclasses.dataclass
class Source:
    """The source side: features `[N, d]`, labels `[N]`, which rows are held out."""
    features: np.ndarray
    labels: np.ndarray
    classes: tuple[str, ...]
    train_rows: np.ndarray
    held_out_rows: np.ndarray
    corpus: str


def load_source(g: build.Group) -> Source:
    """The group's source text, embedded by its backbone's checkpoint."""
    cfg = g.cfg
    corpus = source_text.read_corpus(cfg.align_corpus or source_text.DEFAULT_CORPUS)
    if cfg.align_distance == "otdd":
        if g.task.output_dim + OTDD_CLASSES > MAX_OTDD_CLASSES:
            raise ValueError(f"align_distance=otdd solves a transport problem per pair of "
                             f"classes of both sides: task {g.task.name}'s "
                             f"{g.task.output_dim} and the corpus's {OTDD_CLASSES} are more "
                             f"than {MAX_OTDD_CLASSES} (accepted for it: align_distance=mmd)")
        corpus = source_text.largest_classes(corpus, OTDD_CLASSES)
    directory = source_text.checkpoint_directory(build.weights_source(cfg))
    features = source_text.text_features(corpus.texts, directory)
    if features.shape[1] != g.config.n_embd:
        raise ValueError(f"the word embeddings of {directory} are {features.shape[1]} wide, "
                         f"the backbone {g.config.n_embd}")
    order = np.random.default_rng(0).permutation(len(features))
    n_out = max(2, int(HELD_OUT_FRACTION * len(order)))
    return Source(features, corpus.labels, corpus.classes, np.sort(order[n_out:]),
                  order[:n_out], corpus.directory)  # random order: any prefix is a sample


def _labels(y: np.ndarray, name: str, distance: str) -> np.ndarray:
    y = np.asarray(y)
    if distance == "otdd" and (y.ndim != 1 or not np.issubdtype(y.dtype, np.integer)):
        raise ValueError(f"align_distance=otdd needs one class label per example; task {name} "
                         f"has labels of shape {y.shape[1:]} per example (accepted for it: "
                         "align_distance=mmd)")
    return y.astype(np.int32) if y.ndim == 1 else np.zeros(len(y), np.int32)


def _embedder(g: build.Group) -> Callable:
    """(input params, x, length) -> `[B, d]`: each example's mean input-layer output."""
    model = g.model.clone(stop_after_input=True)

    def embed(params, x, length):
        h = model.apply({"params": {"input": params}}, x, length, deterministic=True)
        if length is None:
            return h.mean(1)
        mask = (jnp.arange(h.shape[1])[None, :] < length[:, None]).astype(h.dtype)
        return (h * mask[..., None]).sum(1) / jnp.maximum(mask.sum(1, keepdims=True), 1.0)
    return embed


def _distance(g: build.Group, source: Source, bandwidths) -> Callable:
    cfg = g.cfg
    if cfg.align_distance == "mmd":
        return lambda t, t_labels, s, s_labels: distances.mmd2(t, s, bandwidths)
    return lambda t, t_labels, s, s_labels: distances.otdd(
        t, t_labels, g.task.output_dim, s, s_labels, len(source.classes))


def align_group(g: build.Group, workdir: str, stop_requested: Callable[[], bool]) -> int:
    """Runs (or resumes) the group's alignment stage, replacing `g.states.trainable['input']`
    with the aligned layers; returns the step reached (`align_steps` unless stopped by
    `stop_requested` or the pod's preemption notice, with a checkpoint written; the input
    layer is replaced only when the stage is complete)."""
    cfg, k = g.cfg, g.num_runs
    source = load_source(g)
    held = _held_out_target(g)
    if len(source.train_rows) < cfg.align_batch_size or len(held["x"]) < 2:
        raise ValueError(f"align_batch_size={cfg.align_batch_size}: the corpus "
                         f"{source.corpus} has {len(source.train_rows)} training documents"
                         f"{' (its 10 largest classes)' if cfg.align_distance == 'otdd' else ''}"
                         f" and the validation split gave {len(held['x'])} examples; "
                         "accepted: a batch of at most that many, and 2 or more examples")
    sample = np.random.default_rng(1).permutation(source.train_rows)  # every class alike
    bandwidths = distances.median_bandwidths(source.features[sample])
    embed, distance = _embedder(g), _distance(g, source, bandwidths)
    tx = optax.adam(cfg.align_learning_rate)
    params = g.states.trainable["input"]
    opt_state = jax.vmap(tx.init)(params)
    feats = jnp.asarray(source.features)  # an argument of the steps, not a constant in them
    labels = jnp.asarray(source.labels)

    def loss_fn(p, x, length, y, rows, feats, labels):
        return distance(embed(p, x, length), y, feats[rows], labels[rows])

    def one_step(p, o, x, length, y, rows, feats, labels):
        value, grads = jax.value_and_grad(loss_fn)(p, x, length, y, rows, feats, labels)
        updates, o = tx.update(grads, o, p)
        return optax.apply_updates(p, updates), o, value

    step_fn = jax.jit(jax.vmap(one_step, in_axes=(0, 0, 0, 0, 0, 0, None, None)),
                      donate_argnums=(0, 1))
    held_fn = jax.jit(jax.vmap(loss_fn, in_axes=(0, None, None, None, None, None, None)))
    # as many held-out documents as held-out examples: the OTDD's cost grows with their
    # square (every class pair is a transport problem over both sets' points)
    held_rows = jnp.asarray(source.held_out_rows[:len(held["x"])])

    def held_out(p) -> np.ndarray:
        return np.asarray(held_fn(p, held["x"], held.get("length"), held["y"], held_rows,
                                  feats, labels))

    ckpts = Checkpoints(os.path.join(workdir, CHECKPOINTS), cfg.keep_checkpoints,
                        cfg.checkpoint_every)
    identity = g.identity()
    start, before, pending, writer = 0, None, [], None

    def check(meta):
        runs.check_identity(meta.get("identity", {}), identity, workdir)
        nonlocal before, pending
        before = meta.get("held_out_before")
        pending = [np.asarray(v, np.float32) for v in meta.get("pending", [])]
    try:
        resumed = ckpts.resume(params, opt_state, check)
        if resumed is not None:
            start, params, opt_state = resumed
            logging.info("alignment resumed from step %d", start)
        if before is None:
            before = held_out(params).tolist()
        # from step 0: every record dropped (step 0 is written again); else those after start
        writer = MetricWriter(workdir, resume_step=start if start else -1, filename=METRICS,
                              tb_dir="tensorboard_align")
        tags = [{"run": i, "learning_rate": g.learning_rates[i], "seed": g.seeds[i]}
                for i in range(k)]
        if start == 0:
            for i in range(k):
                writer.write(0, {"align/held_out_distance": before[i]}, tags[i])
        values, done = pending, start  # the distances since the last log, resumed too
        for step in range(start, cfg.align_steps):
            batch = _target_batch(g, step)
            rows = np.stack([_source_rows(source, seed, step, cfg.align_batch_size)
                             for seed in g.seeds])
            params, opt_state, value = step_fn(params, opt_state, batch["x"],
                                               batch.get("length"), batch["y"], rows,
                                               feats, labels)
            values.append(value)
            done = step + 1
            if done % cfg.log_every == 0 or done == cfg.align_steps:
                train = np.mean(np.stack(values), 0)
                values = []
                now = held_out(params)
                for i in range(k):
                    writer.write(done, {"align/distance": train[i],
                                        "align/held_out_distance": now[i]}, tags[i])
                if jax.process_index() == 0:
                    print(f"align step {done}/{cfg.align_steps}: held-out {cfg.align_distance}"
                          f" {np.mean(now):.5f} (before {np.mean(before):.5f})", flush=True)
            stopping = stop_requested() or ckpts.reached_preemption(done)
            if done % cfg.checkpoint_every == 0 or done == cfg.align_steps or stopping:
                host_p, host_o = jax.tree_util.tree_map(np.asarray, (params, opt_state))
                try:
                    check_finite_state(done, (host_p, host_o))
                except DivergenceError as e:
                    raise ValueError(f"alignment: {e} (here: lower align_learning_rate; "
                                     f"align_distance={cfg.align_distance})") from None
                ckpts.save(done, host_p, host_o, {
                    "identity": identity, "held_out_before": before,
                    "pending": [np.asarray(v).tolist() for v in values]}, force=True)
            if stopping and done < cfg.align_steps:
                return done
    finally:
        if writer is not None:
            writer.close()
        ckpts.wait()
        ckpts.close()
    g.states = g.states.replace(trainable={
        **g.states.trainable, "input": jax.tree_util.tree_map(np.asarray, params)})
    return done


def summary(workdir: str, num_runs: int) -> list[dict[str, float]]:
    """Per run, from align_metrics.jsonl: the held-out distance before the stage and at its
    end (summary.json's `final`); empty dicts when the file is not here."""
    out: list[dict[str, float]] = [{} for _ in range(num_runs)]
    path = os.path.join(workdir, METRICS)
    if not os.path.exists(path):
        return out
    with open(path) as f:
        for line in f:
            r = json.loads(line)
            i = r.get("run", 0)
            if "align/held_out_distance" in r and i < num_runs:
                key = "align/held_out_before" if r["step"] == 0 else "align/held_out_after"
                out[i][key] = r["align/held_out_distance"]
                out[i]["align/steps"] = r["step"]
    return out


def _target_batch(g: build.Group, step: int) -> dict[str, np.ndarray]:
    """`[K, B, ...]`: run k's alignment batch of `step`, from its own data order."""
    per_run = []
    for seed in g.seeds:
        b = g.task.batch("train", step, g.cfg.align_batch_size, seed=int(seed) + _SOURCE_STREAM)
        b = {n: v for n, v in b.items() if n in ("x", "y", "length")}
        b["y"] = _labels(b["y"], g.task.name, g.cfg.align_distance)
        per_run.append(parallel.shard_batch(b, 1))
    return {n: v[0] for n, v in stack_runs(per_run).items()}


def _held_out_target(g: build.Group) -> dict[str, np.ndarray]:
    """The first HELD_OUT_BATCHES validation batches (real rows only), the same every run."""
    split = g.cfg.eval_split or g.task.eval_split
    parts = []
    for i, b in enumerate(g.task.eval_batches(split, g.cfg.align_batch_size, seed=0,
                                              num_batches=HELD_OUT_BATCHES)):
        if i == HELD_OUT_BATCHES:
            break
        keep = np.asarray(b["mask"], bool) if "mask" in b else slice(None)
        parts.append({n: np.asarray(b[n])[keep] for n in ("x", "y", "length") if n in b})
    width = max(p["x"].shape[1] for p in parts)  # bucketed token batches: pad to the longest
    out = {n: np.concatenate([_pad(p[n], width) if n == "x" else p[n] for p in parts])
           for n in parts[0]}
    out["y"] = _labels(out["y"], g.task.name, g.cfg.align_distance)
    return out


def _pad(x: np.ndarray, width: int) -> np.ndarray:
    if x.ndim != 2 or x.shape[1] == width:
        return x
    return np.pad(x, ((0, 0), (0, width - x.shape[1])))


def _source_rows(source: Source, seed: int, step: int, n: int) -> np.ndarray:
    """Run `seed`'s source documents of `step` (training rows, without replacement)."""
    rng = np.random.default_rng([int(seed), int(step), _SOURCE_STREAM])
    return source.train_rows[rng.choice(len(source.train_rows), n, replace=False)]
