"""Reduction-pattern metrics of "Which Tokens to Use?" (Haurum et al., 2023, §5 and supplementary §E–F).

Pruning patterns are boolean keep masks ``(..., P)`` over the P original patches; merging patterns are
integer cluster labels ``(..., P)`` (the output token carrying each patch; −1, dropped, is a label like any
other). Every per-pattern metric is batched over the leading dimensions and returns one value per sample.
Inputs may be NumPy arrays or (CPU or GPU) torch tensors; outputs are NumPy arrays (or floats).

* :func:`ioa` — |M1 ∩ M2| / |M2| (Eq. 1, ``r1 ≥ r2``); :func:`iou` — |M1 ∩ M2| / |M1 ∪ M2| (Eq. 2).
* :func:`ioa_lower_bound` / :func:`iou_lower_bound` — the smallest value two masks of given sizes can
  have; :func:`ioa_lower_bounds` / :func:`iou_lower_bounds` — Algorithms 1–2 (static keep rates, stage
  ``s`` keeps ``⌊P·r^s⌋``).
* :func:`homogeneity` (Eq. 3–5, C = the clusters of M1, K = those of M2) and :func:`nmi` (Eq. 6–7,
  arithmetic normalisation) — scikit-learn's definitions, computed for a whole batch at once.
* :func:`averaged_pattern` (§5.3) and :func:`pearson` between two such maps.
* :func:`procrustes_distance` (orthogonal Procrustes, Ding et al. 2021) and linear :func:`cka` between
  feature sets (CLS features), and :func:`spearman` between a metric and a performance difference (§5.5).
"""

from __future__ import annotations

import warnings
from typing import Any, Iterator

import numpy as np

ArrayLike = Any  # a NumPy array or a torch tensor


def as_numpy(x: ArrayLike) -> np.ndarray:
    """``x`` as a NumPy array (torch tensors are detached and moved to the CPU)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _masks(m1: ArrayLike, m2: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    a, b = as_numpy(m1).astype(bool), as_numpy(m2).astype(bool)
    if a.shape != b.shape:
        raise ValueError(f"masks: shapes {a.shape} and {b.shape} differ")
    return a, b


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """``num / den`` with 0 / 0 = 1 (an empty set is contained in, and equal to, an empty set)."""
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    return np.where(den > 0, num / np.maximum(den, 1), 1.0)


# ------------------------------------------------------------------------------------------- pruning
def ioa(m1: ArrayLike, m2: ArrayLike) -> np.ndarray:
    """Intersection over area: the fraction of the tokens kept in ``m2`` that ``m1`` keeps too (Eq. 1;
    ``m1`` the pattern of the higher keep rate). Masks ``(..., P)`` → ``(...)``; an empty ``m2`` gives 1."""
    a, b = _masks(m1, m2)
    return _ratio((a & b).sum(-1), b.sum(-1))


def iou(m1: ArrayLike, m2: ArrayLike) -> np.ndarray:
    """Intersection over union of two keep masks (Eq. 2). ``(..., P)`` → ``(...)``; two empty masks give 1."""
    a, b = _masks(m1, m2)
    return _ratio((a & b).sum(-1), (a | b).sum(-1))


def _least_overlap(num_patches: int, kept1: ArrayLike, kept2: ArrayLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    k1, k2 = np.asarray(kept1, dtype=np.int64), np.asarray(kept2, dtype=np.int64)
    if np.any((k1 < 0) | (k1 > num_patches) | (k2 < 0) | (k2 > num_patches)):
        raise ValueError(f"kept: counts must lie in [0, {num_patches}] (the number of patches)")
    return np.maximum(k1 + k2 - num_patches, 0), k1, k2


def ioa_lower_bound(num_patches: int, kept1: ArrayLike, kept2: ArrayLike) -> np.ndarray:
    """The smallest IoA of a mask keeping ``kept1`` of ``num_patches`` patches and one keeping ``kept2``:
    the two overlap in at least ``max(0, kept1 + kept2 − P)`` patches (supplementary §F). Broadcasts."""
    overlap, _, k2 = _least_overlap(num_patches, kept1, kept2)
    return _ratio(overlap, k2)


def iou_lower_bound(num_patches: int, kept1: ArrayLike, kept2: ArrayLike) -> np.ndarray:
    """The smallest IoU of masks keeping ``kept1`` and ``kept2`` of ``num_patches`` patches: at the least
    overlap the union is all P patches (or the overlap is 0). Broadcasts."""
    overlap, k1, k2 = _least_overlap(num_patches, kept1, kept2)
    return _ratio(overlap, np.where(overlap > 0, num_patches, k1 + k2))


def stage_keep_counts(num_patches: int, keep_rate: float, stages: int = 3) -> list[int]:
    """``⌊P·r^s⌋`` for stages ``s = 1..stages`` (seed 004's static keep counts, Algorithms 1–2)."""
    if not 0.0 < keep_rate <= 1.0:
        raise ValueError(f"keep_rate: {keep_rate!r} is outside the allowed range (0, 1]")
    return [int(round(num_patches * keep_rate ** s, 9)) for s in range(1, stages + 1)]


def ioa_lower_bounds(num_patches: int, r1: float, r2: float, stages: int = 3) -> list[float]:
    """Algorithm 1: the lower bound of the IoA at each stage for static keep rates ``r1 ≥ r2``."""
    if r1 < r2:
        raise ValueError(f"r1: {r1!r} must be >= r2 ({r2!r}) for the IoA")
    counts = zip(stage_keep_counts(num_patches, r1, stages), stage_keep_counts(num_patches, r2, stages))
    return [float(ioa_lower_bound(num_patches, a, b)) for a, b in counts]


def iou_lower_bounds(num_patches: int, r1: float, r2: float, stages: int = 3) -> list[float]:
    """Algorithm 2: the lower bound of the IoU at each stage for static keep rates ``r1`` and ``r2``."""
    counts = zip(stage_keep_counts(num_patches, r1, stages), stage_keep_counts(num_patches, r2, stages))
    return [float(iou_lower_bound(num_patches, a, b)) for a, b in counts]


# ------------------------------------------------------------------------------------------- merging
def _contingency_terms(c1: ArrayLike, c2: ArrayLike) -> Iterator[tuple[np.ndarray, ...]]:
    """Per chunk of samples of labels ``(..., P)``: the contingency tables ``(S, L1, L2)`` and the mutual
    information and both entropies (nats) of each sample, computed as scikit-learn's
    ``mutual_info_score`` and ``entropy`` do (terms below float64 eps dropped, MI clipped at 0), but for a
    whole batch at once: per-sample calls cost about 1 ms each, which made a data set's analysis take hours."""
    a, b = as_numpy(c1), as_numpy(c2)
    if a.shape != b.shape:
        raise ValueError(f"labels: shapes {a.shape} and {b.shape} differ")
    flat_a, flat_b = a.reshape(-1, a.shape[-1]).astype(np.int64), b.reshape(-1, b.shape[-1]).astype(np.int64)
    flat_a, flat_b = flat_a - flat_a.min(initial=0), flat_b - flat_b.min(initial=0)
    la, lb = int(flat_a.max(initial=0)) + 1, int(flat_b.max(initial=0)) + 1
    n = flat_a.shape[1]
    chunk = max(1, 4_000_000 // (la * lb))
    eps = np.finfo(np.float64).eps
    for i in range(0, len(flat_a), chunk):
        x, y = flat_a[i:i + chunk], flat_b[i:i + chunk]
        s = len(x)
        joint = (np.arange(s)[:, None] * la + x) * lb + y
        table = np.bincount(joint.ravel(), minlength=s * la * lb).reshape(s, la, lb).astype(np.float64)
        pi, pj = table.sum(2), table.sum(1)
        with np.errstate(divide="ignore", invalid="ignore"):
            terms = table / n * np.log(table * n / (pi[:, :, None] * pj[:, None, :]))
            terms = np.where((table > 0) & (np.abs(terms) >= eps), terms, 0.0)
            mi = np.clip(terms.sum((1, 2)), 0.0, None)
            mi[((pi > 0).sum(1) == 1) | ((pj > 0).sum(1) == 1)] = 0.0
            h1 = -np.where(pi > 0, pi / n * np.log(pi / n), 0.0).sum(1)
            h2 = -np.where(pj > 0, pj / n * np.log(pj / n), 0.0).sum(1)
        yield table, mi, h1, h2


def _batched(c1: ArrayLike, c2: ArrayLike, score: Any) -> np.ndarray:
    shape = as_numpy(c1).shape[:-1]
    out = np.concatenate([score(*terms) for terms in _contingency_terms(c1, c2)]) if np.prod(shape) else np.zeros(0)
    return out.reshape(shape)


def homogeneity(c1: ArrayLike, c2: ArrayLike) -> np.ndarray:
    """Homogeneity of the clusters ``c2`` (K) with respect to the clusters ``c1`` (C) of the pattern with the
    higher keep rate (Eq. 3–5): 1 when each cluster of ``c2`` holds patches of one cluster of ``c1``.
    Labels ``(..., P)`` → ``(...)``; per sample equal to scikit-learn's ``homogeneity_score(c1, c2)``."""
    def score(table: np.ndarray, mi: np.ndarray, h1: np.ndarray, h2: np.ndarray) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(h1 > 0, mi / h1, 1.0)

    return _batched(c1, c2, score)


def nmi(c1: ArrayLike, c2: ArrayLike) -> np.ndarray:
    """Normalised mutual information of two clusterings, normalised by the arithmetic mean of their
    entropies (Eq. 6–7; equal to the V-measure). Labels ``(..., P)`` → ``(...)``; per sample equal to
    scikit-learn's ``normalized_mutual_info_score(c1, c2, average_method="arithmetic")``."""
    def score(table: np.ndarray, mi: np.ndarray, h1: np.ndarray, h2: np.ndarray) -> np.ndarray:
        single = ((table.sum(2) > 0).sum(1) == 1) & ((table.sum(1) > 0).sum(1) == 1)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(single, 1.0, np.where(mi == 0, 0.0, mi / ((h1 + h2) / 2)))

    return _batched(c1, c2, score)


# -------------------------------------------------------------------------------- averaged patterns
def averaged_pattern(masks: ArrayLike) -> np.ndarray:
    """§5.3's data-set averaged pattern: for keep masks ``(..., N, S, P)`` of N images at S sites, the number
    of the S + 1 stages (before the first site and after each) in which each patch is kept, averaged over
    the N images → ``(..., P)``, values in [1, S + 1]."""
    m = as_numpy(masks).astype(bool)
    if m.ndim < 3:
        raise ValueError(f"masks: expected (..., images, sites, patches), got shape {m.shape}")
    return 1.0 + m.sum(axis=-2).mean(axis=-2)


def pearson(a: ArrayLike, b: ArrayLike) -> np.ndarray:
    """Pearson's correlation coefficient of two maps over the last axis ``(..., P)`` → ``(...)``
    (NaN where a map is constant)."""
    x, y = as_numpy(a).astype(np.float64), as_numpy(b).astype(np.float64)
    x = x - x.mean(-1, keepdims=True)
    y = y - y.mean(-1, keepdims=True)
    den = np.sqrt((x * x).sum(-1) * (y * y).sum(-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return (x * y).sum(-1) / den


# ------------------------------------------------------------------------------ feature alignment
def _centred_unit(x: np.ndarray) -> np.ndarray:
    """Features ``(n, d)`` centred over the n samples and scaled to unit Frobenius norm."""
    x = x - x.mean(axis=0, keepdims=True)
    norm = np.linalg.norm(x)
    return x / norm if norm > 0 else x


def _pairs(x: ArrayLike, y: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    a, b = as_numpy(x).astype(np.float64), as_numpy(y).astype(np.float64)
    if a.ndim < 2 or a.shape[:-1] != b.shape[:-1]:
        raise ValueError(f"features: expected (..., n, d1) and (..., n, d2) with the same n, got {a.shape} and {b.shape}")
    return a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:])


def procrustes_distance(x: ArrayLike, y: ArrayLike) -> np.ndarray:
    """Orthogonal Procrustes distance between features ``(..., n, d1)`` and ``(..., n, d2)`` of the same n
    inputs: after centring and scaling each to unit Frobenius norm, ``min_R ‖X − Y R‖²_F = 2 − 2‖XᵀY‖_*``
    over orthogonal R (0 when the two differ by a rotation; at most 2). → ``(...)``."""
    from scipy.linalg import orthogonal_procrustes

    a, b = _pairs(x, y)
    out = []
    for u, v in zip(a, b):
        u, v = _centred_unit(u), _centred_unit(v)
        d = max(u.shape[1], v.shape[1])  # zero columns change no singular value
        u, v = np.pad(u, ((0, 0), (0, d - u.shape[1]))), np.pad(v, ((0, 0), (0, d - v.shape[1])))
        _, nuclear = orthogonal_procrustes(v, u)  # the sum of the singular values of vᵀu
        out.append(max(0.0, 2.0 - 2.0 * nuclear))
    return np.array(out).reshape(as_numpy(x).shape[:-2])


def cka(x: ArrayLike, y: ArrayLike) -> np.ndarray:
    """Linear centred kernel alignment ``‖YᵀX‖²_F / (‖XᵀX‖_F ‖YᵀY‖_F)`` of features ``(..., n, d1)`` and
    ``(..., n, d2)`` (Kornblith et al. 2019; 1 for features equal up to rotation and scale). → ``(...)``."""
    a, b = _pairs(x, y)
    out = []
    for u, v in zip(a, b):
        u, v = u - u.mean(0), v - v.mean(0)
        den = np.linalg.norm(u.T @ u) * np.linalg.norm(v.T @ v)
        out.append(np.linalg.norm(v.T @ u) ** 2 / den if den > 0 else np.nan)
    return np.array(out).reshape(as_numpy(x).shape[:-2])


def spearman(metric: ArrayLike, performance_difference: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Spearman's rank correlation (and its two-sided p-value) between a pattern metric ``d(M_A, M_B)`` and
    the performance difference ``f(A) − f(B)`` over model pairs (§5.5), along the last axis ``(..., K)``
    (NaN where either is constant)."""
    from scipy.stats import spearmanr

    a, b = as_numpy(metric).astype(np.float64), as_numpy(performance_difference).astype(np.float64)
    if a.shape != b.shape or a.ndim == 0:
        raise ValueError(f"spearman: expected two (..., K) arrays of one shape, got {a.shape} and {b.shape}")
    with warnings.catch_warnings():  # a constant input gives NaN, which is the answer
        warnings.simplefilter("ignore")
        rows = [spearmanr(u, v) for u, v in zip(a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1]))]
    rho = np.array([r.statistic for r in rows]).reshape(a.shape[:-1])
    p = np.array([r.pvalue for r in rows]).reshape(a.shape[:-1])
    return rho, p
