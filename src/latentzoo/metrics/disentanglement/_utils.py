"""Shared helpers: array conversion, histogram discretisation and discrete mutual information.

All functions take one row per sample (N, dims), the transpose of disentanglement_lib's ("dlib")
layout. The discretiser and the MI estimator reproduce dlib's ``utils._histogram_discretize`` and
``utils.discrete_mutual_info`` (sklearn ``mutual_info_score``, natural log) with bincount
contingency tables instead of a Python double loop.
"""

from __future__ import annotations

from typing import Any

import numpy as np

ArrayLike = Any  # numpy array, torch tensor or anything np.asarray understands


def to_numpy(x: ArrayLike) -> np.ndarray:
    """Convert a torch tensor / array-like to numpy without changing its dtype."""
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch here
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def as_codes(codes: ArrayLike) -> np.ndarray:
    """Codes as a floating (N, D) array (keeps float32, so histogram edges match dlib's)."""
    c = to_numpy(codes)
    if c.ndim == 1:
        c = c[:, None]
    if c.ndim != 2:
        raise ValueError(f"codes must have shape (N, D), got {c.shape}")
    if not np.issubdtype(c.dtype, np.floating):
        c = c.astype(np.float64)
    return c


def as_factors(factors: ArrayLike, n: int | None = None) -> np.ndarray:
    """Factors as an integer (N, K) array of class indices."""
    f = to_numpy(factors)
    if f.ndim == 1:
        f = f[:, None]
    if f.ndim != 2:
        raise ValueError(f"factors must have shape (N, K), got {f.shape}")
    if not np.issubdtype(f.dtype, np.integer):
        if not np.all(np.equal(np.mod(f, 1), 0)):
            raise ValueError("factors must be integer class indices, not continuous values")
        f = f.astype(np.int64)
    if n is not None and f.shape[0] != n:
        raise ValueError(f"codes have {n} rows but factors have {f.shape[0]}")
    return f


def histogram_discretize(codes: ArrayLike, num_bins: int = 20) -> np.ndarray:
    """Discretise each code dimension into ``num_bins`` equal-width bins over its own range.

    Same as dlib ``_histogram_discretize``: edges from ``np.histogram(code, num_bins)``, then
    ``np.digitize`` against all edges but the last, so bin ids are 1..num_bins (the maximum falls
    in the last bin). Returns an int64 (N, D) array.
    """
    c = as_codes(codes)
    out = np.empty(c.shape, dtype=np.int64)
    for i in range(c.shape[1]):  # loop over dims only; each column is vectorised
        edges = np.histogram_bin_edges(c[:, i], num_bins)
        out[:, i] = np.digitize(c[:, i], edges[:-1])
    return out


def _dense_labels(x: np.ndarray) -> tuple[np.ndarray, int]:
    """Relabel one integer column to 0..n_values-1 (as sklearn's contingency matrix does)."""
    uniq, inv = np.unique(x, return_inverse=True)
    return inv.reshape(-1), len(uniq)


def _mi_from_counts(counts: np.ndarray, n: int) -> np.ndarray:
    """Mutual information (nats) from stacked contingency tables ``counts`` (P, A, B)."""
    counts = counts.astype(np.float64)
    row = counts.sum(axis=2, keepdims=True)
    col = counts.sum(axis=1, keepdims=True)
    nz = counts > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = counts * (np.log(counts) + np.log(n) - np.log(row) - np.log(col)) / n
    terms = np.where(nz, terms, 0.0)
    return np.clip(terms.sum(axis=(1, 2)), 0.0, None)


def discrete_mutual_info(a: ArrayLike, b: ArrayLike) -> np.ndarray:
    """Matrix of discrete mutual information m[i, j] = I(a_i; b_j) in nats.

    ``a`` (N, P) and ``b`` (N, Q) hold discrete labels (any integers). Matches
    ``sklearn.metrics.mutual_info_score(b[:, j], a[:, i])`` (dlib ``discrete_mutual_info``) but
    builds all contingency tables of one column of ``b`` with a single ``np.bincount``.
    """
    a = as_factors(a)
    b = as_factors(b, a.shape[0])
    n = a.shape[0]
    a_lab = [_dense_labels(a[:, i]) for i in range(a.shape[1])]
    b_lab = [_dense_labels(b[:, j]) for j in range(b.shape[1])]
    n_a = max(k for _, k in a_lab)
    a_idx = np.stack([lab for lab, _ in a_lab], axis=1)  # (N, P)
    offsets = np.arange(a.shape[1]) * n_a
    m = np.zeros((a.shape[1], b.shape[1]))
    for j, (b_j, n_b) in enumerate(b_lab):
        flat = ((a_idx + offsets) * n_b + b_j[:, None]).ravel()
        counts = np.bincount(flat, minlength=a.shape[1] * n_a * n_b)
        m[:, j] = _mi_from_counts(counts.reshape(a.shape[1], n_a, n_b), n)
    return m


def discrete_entropy(y: ArrayLike) -> np.ndarray:
    """Empirical entropy (nats) of each column of ``y`` (N, K); dlib ``discrete_entropy``."""
    y = as_factors(y)
    h = np.zeros(y.shape[1])
    for j in range(y.shape[1]):
        _, counts = np.unique(y[:, j], return_counts=True)
        p = counts / y.shape[0]
        h[j] = -np.sum(p * np.log(p))
    return h


def top_two_gap(matrix: np.ndarray) -> np.ndarray:
    """Per column, the largest minus the second-largest entry (dlib's MIG / SAP gap)."""
    if matrix.shape[0] < 2:
        raise ValueError("the gap between the two best codes needs at least 2 code dimensions")
    top2 = -np.partition(-matrix, 1, axis=0)[:2]
    return top2[0] - top2[1]


def draw_random_state(rng: np.random.Generator) -> int:
    """An sklearn ``random_state`` drawn from the metric RNG (spec §0)."""
    return int(rng.integers(0, 2**31 - 1))
