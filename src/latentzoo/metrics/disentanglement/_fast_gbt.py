"""sklearn's ``GradientBoostingClassifier`` for DCI, grown level by level in numba.

sklearn's GBT (the estimator disentanglement_lib uses for DCI) fits, at every stage and for every
class, a depth-3 least-squares regression tree to the negative gradient y_k - p_k of the
multinomial log-loss, replaces each leaf value by a Newton step
(K-1)/K * sum(y - p) / sum(p (1 - p)) (binary: sum(y - p) / sum(p (1 - p))) and adds
``learning_rate`` times it to the raw scores; ``feature_importances_`` is the total
least-squares impurity decrease sum(G_L^2/n_L + G_R^2/n_R - G^2/n) per feature, normalised.

This module (``dci(..., estimator="fast")``) runs that algorithm with the same split
candidates (every midpoint between distinct values; values closer than sklearn's 1e-7 count as
equal) and the same stopping rules (nodes with fewer than two samples or zero impurity are
leaves). Only the search differs: each code is sorted once, and each level of the trees of a
stage is grown in one pass over each sorted code that keeps running gradient sums for every
(node, class) at once: O(depth x codes x samples) per tree, no re-sorting per node. Scores
match sklearn's up to rounding and tie-breaking between equally good splits (sklearn visits the
codes in a random order). One factor runs on one thread; numba releases the GIL, so ``dci``
fits factors on threads.
"""

from __future__ import annotations

import numba as nb
import numpy as np

# sklearn's tree.FEATURE_THRESHOLD: neighbouring values closer than this are not split apart
FEATURE_THRESHOLD = 1e-7
# sklearn's tree EPSILON: a node whose impurity is below this becomes a leaf
EPSILON = np.finfo(np.float64).eps


@nb.njit(cache=True, nogil=True)
def _residuals(raw, onehot, r, h, binary):  # pragma: no cover - numba
    """Residuals r = y - p and hessians h = p (1 - p) of the log-loss, (samples, trees)."""
    n_trees = raw.shape[1]
    for i in range(raw.shape[0]):
        if binary:
            p = 1.0 / (1.0 + np.exp(-raw[i, 0]))
            r[i, 0] = onehot[i, 0] - p
            h[i, 0] = p * (1.0 - p)
            continue
        top = raw[i, 0]
        for k in range(1, n_trees):
            top = max(top, raw[i, k])
        total = 0.0
        for k in range(n_trees):
            r[i, k] = np.exp(raw[i, k] - top)
            total += r[i, k]
        for k in range(n_trees):
            p = r[i, k] / total
            r[i, k] = onehot[i, k] - p
            h[i, k] = p * (1.0 - p)


# Per-(node, class) state of the split search: one 64-byte row each.
G_LEFT, N_LEFT, LAST, BEST, TOTAL, COUNT, BEST_CODE, BEST_RANK = range(8)


@nb.njit(cache=True, nogil=True)
def _grow_trees(
    bins_t, order, inv, r, h, raw, learning_rate, scale, max_depth,
    feat, split_bin, value, is_leaf, imp, node_of, state,
):  # pragma: no cover - numba  # fmt: skip
    """Grow the trees of all classes of one stage together and update the raw scores.

    Trees use heap layout (children of j: 2j+1, 2j+2) and grow level by level: for each level
    and code, one pass over the samples sorted by that code keeps running gradient sums for
    every (node, class) at once, so a split search costs one pass however many nodes a level
    has. ``bins_t[f, i]`` is sample i's rank on code f and ``order[f]`` the samples sorted by
    it; ``inv[m] = 1 / m``; ``node_of[i, c]`` is sample i's node in tree c, or the extra
    "done" node once it is in a leaf; ``state`` is (n_nodes + 1, classes, 8) scratch.
    Candidates are visited code by code, rank by rank; the first best split wins.
    """
    n_codes, n = bins_t.shape
    trees = raw.shape[1]
    done = state.shape[0] - 1
    node_of[:, :] = 0
    for depth in range(max_depth):
        lo, hi = 2**depth - 1, 2 ** (depth + 1) - 1
        state[:, :, :] = 0.0
        state[:, :, BEST_CODE] = -1.0
        for i in range(n):
            for c in range(trees):
                st = state[node_of[i, c], c]
                st[TOTAL] += r[i, c]
                st[COUNT] += 1.0
                st[BEST] += r[i, c] * r[i, c]  # sum of squares until the scan starts
        for j in range(lo, hi):
            for c in range(trees):
                st = state[j, c]
                n_j = st[COUNT]
                # leaves: fewer than two samples or (numerically) constant residuals
                st[G_LEFT] = n_j >= 2.0 and st[BEST] / n_j - (st[TOTAL] / n_j) ** 2 > EPSILON
                st[BEST] = -np.inf
        for i in range(n):  # samples of leaves take no further part in the split search
            for c in range(trees):
                if state[node_of[i, c], c, G_LEFT] == 0.0:
                    node_of[i, c] = done
        for f in range(n_codes):
            state[:, :, G_LEFT] = 0.0
            state[:, :, N_LEFT] = 0.0
            state[:, :, LAST] = -1.0
            rank = bins_t[f]
            for p in range(n):
                i = order[f, p]
                b = rank[i]
                residual = r[i]
                nodes = node_of[i]
                for c in range(trees):
                    st = state[nodes[c], c]
                    gl = st[G_LEFT]
                    if b != st[LAST] and st[LAST] >= 0.0:  # candidate: left = ranks <= last
                        m = int(st[N_LEFT])
                        gr = st[TOTAL] - gl
                        proxy = gl * gl * inv[m] + gr * gr * inv[int(st[COUNT]) - m]
                        if proxy > st[BEST]:
                            st[BEST] = proxy
                            st[BEST_RANK] = st[LAST]
                            st[BEST_CODE] = f
                    st[G_LEFT] = gl + residual[c]
                    st[N_LEFT] += 1.0
                    st[LAST] = b
        for j in range(lo, hi):
            for c in range(trees):
                st = state[j, c]
                if st[BEST_CODE] >= 0.0:
                    f = int(st[BEST_CODE])
                    is_leaf[c, j] = False
                    feat[c, j] = f
                    split_bin[c, j] = int(st[BEST_RANK])
                    imp[f] += st[BEST] - st[TOTAL] * st[TOTAL] / st[COUNT]
        for i in range(n):
            for c in range(trees):
                j = node_of[i, c]
                if j != done:  # every node still holding samples was split
                    node_of[i, c] = 2 * j + 1 + (bins_t[feat[c, j], i] > split_bin[c, j])
    # leaf values: sklearn's Newton step (_update_terminal_regions), then the raw scores.
    # node_of no longer knows the leaves of early stops, so walk each sample down its tree.
    state[:, :, :] = 0.0
    for i in range(n):
        for c in range(trees):
            j = 0
            while not is_leaf[c, j]:
                j = 2 * j + 1 + (bins_t[feat[c, j], i] > split_bin[c, j])
            node_of[i, c] = j
            state[j, c, TOTAL] += r[i, c]
            state[j, c, COUNT] += h[i, c]
    for j in range(value.shape[1]):
        for c in range(trees):
            d = state[j, c, COUNT]
            value[c, j] = scale * state[j, c, TOTAL] / d if abs(d) >= 1e-150 else 0.0
    for i in range(n):
        for c in range(trees):
            raw[i, c] += learning_rate * value[c, node_of[i, c]]


@nb.njit(cache=True, nogil=True)
def _predict_raw(bins, init, feat, split_bin, value, is_leaf, learning_rate):  # pragma: no cover
    n = bins.shape[0]
    n_stages, n_trees, _ = feat.shape
    out = np.empty((n, n_trees))
    for k in range(n_trees):
        out[:, k] = init[k]
    for it in range(n_stages):
        for k in range(n_trees):
            tf, tb, tv, tl = feat[it, k], split_bin[it, k], value[it, k], is_leaf[it, k]
            for i in range(n):
                node = 0
                while not tl[node]:
                    node = 2 * node + (1 if bins[i, tf[node]] <= tb[node] else 2)
                out[i, k] += learning_rate * tv[node]
    return out


def rank_codes(x: np.ndarray, x_test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each code's rank among sklearn's split thresholds (train and test): the midpoints between
    neighbouring distinct values, gaps of at most 1e-7 not counting. A value goes left of
    threshold t when it is <= t, as in sklearn's ``predict``."""
    thresholds = []
    for f in range(x.shape[1]):
        distinct = np.unique(x[:, f])
        gap = np.flatnonzero(np.diff(distinct) > FEATURE_THRESHOLD)
        thresholds.append((distinct[gap] + distinct[gap + 1]) / 2.0)

    def rank(data: np.ndarray) -> np.ndarray:
        cols = [np.searchsorted(t, data[:, f], side="left") for f, t in enumerate(thresholds)]
        return np.stack(cols, axis=1).astype(np.int64)

    return rank(x), rank(x_test)


def fit_fast_gbt(
    x: np.ndarray,
    y: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    n_estimators: int = 100,
    learning_rate: float = 0.1,
    max_depth: int = 3,
) -> tuple[np.ndarray, float, float]:
    """Fit one factor on one thread (numba releases the GIL, so factors can run on threads);
    returns (normalised importances, train accuracy, test accuracy)."""
    # sklearn's trees see float32 inputs
    x = np.asarray(x, dtype=np.float32).astype(np.float64)
    x_test = np.asarray(x_test, dtype=np.float32).astype(np.float64)
    bins, bins_test = rank_codes(x, x_test)
    bins_t = np.ascontiguousarray(bins.T)
    order = np.ascontiguousarray(np.argsort(bins_t, axis=1, kind="stable"))
    classes, yi = np.unique(y, return_inverse=True)
    n, n_classes = len(yi), len(classes)
    if n_classes < 2:
        raise ValueError("DCI needs at least two classes of every factor in the training set")
    binary = n_classes == 2
    n_trees = 1 if binary else n_classes
    onehot = (yi[:, None] == (np.arange(n_trees)[None, :] + binary)).astype(np.float64)
    prior = np.bincount(yi, minlength=n_classes) / n
    init = np.log(prior[1:] / prior[:1]) if binary else np.log(prior)
    raw = np.ascontiguousarray(np.repeat(init[None, :], n, axis=0))  # (samples, trees)
    r = np.empty_like(raw)
    h = np.empty_like(raw)
    scale = 1.0 if binary else (n_classes - 1.0) / n_classes
    n_nodes = 2 ** (max_depth + 1) - 1
    feat = np.full((n_estimators, n_trees, n_nodes), -1, dtype=np.int64)
    split_bin = np.zeros((n_estimators, n_trees, n_nodes), dtype=np.int64)
    value = np.zeros((n_estimators, n_trees, n_nodes))
    is_leaf = np.ones((n_estimators, n_trees, n_nodes), dtype=np.bool_)
    importance = np.zeros(x.shape[1])
    inv = 1.0 / np.maximum(np.arange(n + 1), 1)
    node_of = np.empty((n, n_trees), np.int64)
    state = np.empty((n_nodes + 1, n_trees, 8))
    for it in range(n_estimators):
        _residuals(raw, onehot, r, h, binary)
        _grow_trees(
            bins_t, order, inv, r, h, raw, learning_rate, scale, max_depth,
            feat[it], split_bin[it], value[it], is_leaf[it], importance, node_of, state,
        )  # fmt: skip
    raw_test = _predict_raw(bins_test, init, feat, split_bin, value, is_leaf, learning_rate)
    if importance.sum() > 0:
        importance = importance / importance.sum()

    def predict(scores: np.ndarray) -> np.ndarray:
        idx = (scores[:, 0] > 0).astype(np.int64) if binary else scores.argmax(axis=1)
        return classes[idx]

    return (
        importance,
        float(np.mean(predict(raw) == y)),
        float(np.mean(predict(raw_test) == y_test)),
    )
