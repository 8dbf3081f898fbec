"""Distances between two sets of embedded examples: how far the new input layer's embedding
of the target task is from the pretrained model's own input embeddings of its source
modality (the alignment stage of ORCA, Shen et al. 2023, `fpt_jax.align`).

  mmd2   squared maximum mean discrepancy with a sum of Gaussian kernels at several
         bandwidths (Gretton et al. 2012), unbiased (U-statistic) or biased (V-statistic)
  otdd   the optimal-transport dataset distance (Alvarez-Melis and Fusi 2020) between two
         labelled sets: transport cost ||x - x'||^2 + W2^2(class of x, class of x'), where
         the label-to-label term is the squared 2-Wasserstein distance between the two
         classes' point clouds; every transport problem is solved by ott-jax (debiased
         entropic OT, the Sinkhorn divergence), so it is differentiable in the embeddings.

Both take `[n, d]` and `[m, d]` arrays and return a scalar; both are jittable and vmappable.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

# The kernel bandwidths, as multiples of the median distance between source examples.
BANDWIDTH_FACTORS = (0.25, 0.5, 1.0, 2.0, 4.0)


def median_bandwidths(source: np.ndarray, factors: Sequence[float] = BANDWIDTH_FACTORS,
                      max_points: int = 2048) -> tuple[float, ...]:
    """Bandwidths `factors x` the median pairwise distance of (up to `max_points` of) the
    source examples: fixed once, so the kernel, and the loss it defines, do not move."""
    x = np.asarray(source, np.float64)[:max_points]
    sq = np.sum(x * x, 1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2 * x @ x.T, 0.0)
    median = float(np.sqrt(np.median(d2[np.triu_indices(len(x), 1)])))
    if not median > 0:
        raise ValueError("the source examples are all equal: no kernel bandwidth to set")
    return tuple(f * median for f in factors)


def _sq_distances(a: jax.Array, b: jax.Array) -> jax.Array:
    d2 = jnp.sum(a * a, 1)[:, None] + jnp.sum(b * b, 1)[None, :] - 2 * a @ b.T
    return jnp.maximum(d2, 0.0)


def mmd2(x: jax.Array, y: jax.Array, bandwidths: Sequence[float],
         unbiased: bool = True) -> jax.Array:
    """Squared MMD between the samples `x` [n, d] and `y` [m, d] under the kernel
    k(a, b) = sum_s exp(-||a - b||^2 / (2 s^2)) over `bandwidths`. Unbiased: the diagonal
    terms k(x_i, x_i) are left out of the within-sample means (can be slightly negative)."""
    x, y = x.astype(jnp.float32), y.astype(jnp.float32)

    def kernel(a, b):
        d2 = _sq_distances(a, b)
        return sum(jnp.exp(-d2 / (2.0 * s * s)) for s in bandwidths)

    kxx, kyy, kxy = kernel(x, x), kernel(y, y), kernel(x, y)
    n, m = x.shape[0], y.shape[0]
    if unbiased:
        within_x = (kxx.sum() - jnp.trace(kxx)) / (n * (n - 1))
        within_y = (kyy.sum() - jnp.trace(kyy)) / (m * (m - 1))
    else:
        within_x, within_y = kxx.mean(), kyy.mean()
    return within_x + within_y - 2.0 * kxy.mean()


def _divergence(cost_xy, cost_xx, cost_yy, a, b, epsilon):
    from ott.geometry import geometry  # imported with the first OTDD: ott is heavy
    from ott.tools import sinkhorn_divergence
    value, _ = sinkhorn_divergence.sinkhorn_divergence(
        geometry.Geometry, cost_xy, cost_xx, cost_yy, a=a, b=b, epsilon=epsilon)
    return value


def otdd(x: jax.Array, x_labels: jax.Array, x_classes: int, y: jax.Array,
         y_labels: jax.Array, y_classes: int, epsilon: float | None = None) -> jax.Array:
    """The OTDD between the labelled sets (`x` [n, d], int labels in [0, x_classes)) and
    (`y` [m, d], labels in [0, y_classes)), both debiased (Sinkhorn divergences).

    Classes are masks over the points, so shapes never depend on the labels (jit); a class
    absent from a set gets uniform weights over that set's points, and no point carries
    its label, so its row of the label distances is never read. `epsilon` (None: ott's
    default, relative to the cost's scale) regularises every transport problem."""
    x, y = x.astype(jnp.float32), y.astype(jnp.float32)
    z = jnp.concatenate([x, y])  # the classes of both sets, as one list
    labels = jnp.concatenate([x_labels, y_labels + x_classes])
    classes = x_classes + y_classes
    masks = (labels[None, :] == jnp.arange(classes)[:, None]).astype(jnp.float32)  # [C, n+m]
    on_y = jnp.arange(z.shape[0]) >= x.shape[0]  # which set each point is in
    class_on_y = jnp.arange(classes) >= x_classes  # which set each class is of
    fallback = (on_y[None, :] == class_on_y[:, None]).astype(jnp.float32)
    masks = jnp.where(masks.sum(1, keepdims=True) > 0, masks, fallback)
    weights = masks / masks.sum(1, keepdims=True)
    d2 = _sq_distances(z, z)

    def class_distance(wi, wj):  # W2^2 between two classes' clouds (within the union of points)
        return _divergence(d2, d2, d2, wi, wj, epsilon)

    pairs = jax.vmap(lambda wi: jax.vmap(lambda wj: class_distance(wi, wj))(weights))(weights)
    pairs = jnp.maximum(0.5 * (pairs + pairs.T), 0.0)  # [C, C], symmetric, >= 0
    cost = d2 + pairs[labels][:, labels]  # the augmented (feature, label) ground cost
    n = x.shape[0]
    a = jnp.full((n,), 1.0 / n)
    b = jnp.full((y.shape[0],), 1.0 / y.shape[0])
    return _divergence(cost[:n, n:], cost[:n, :n], cost[n:, n:], a, b, epsilon)
