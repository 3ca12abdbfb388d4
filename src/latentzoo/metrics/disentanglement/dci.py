"""DCI: Disentanglement, Completeness, Informativeness (Eastwood & Williams 2018, "A Framework
for the Quantitative Evaluation of Disentangled Representations").

Follows disentanglement_lib ``dci.compute_dci``: for every factor k a gradient-boosted tree
classifier (sklearn ``GradientBoostingClassifier()`` defaults: 100 stages, learning rate 0.1,
depth 3) predicts the factor class from the raw codes; R[:, k] = |feature_importances_|.

* D = sum_i rho_i (1 - H_K(P_i.)), P_ik = R_ik / sum_k R_ik, rho_i = sum_k R_ik / sum R;
* C = sum_k (sum_i R_ik / sum R) (1 - H_L(P~_.k)), P~_ik = R_ik / sum_i R_ik;
* informativeness = mean classification *accuracy* over factors (dlib names it an error).

Entropies are in base K (factors) / L (codes) after adding 1e-11, as dlib does.

Estimators (``estimator=``):

* ``"gbt"`` (canonical): sklearn ``GradientBoostingClassifier``, one per factor, fitted in
  parallel with joblib. Exact, but minutes at dlib sizes (10,000 x 10 codes, dSprites: 113
  one-vs-rest trees per stage).
* ``"fast"`` (explicit opt-in, needs ``numba``): the *same* boosting algorithm and split
  candidates (least-squares trees on the negative gradient, sklearn's Newton leaf values, the
  same impurity importances), grown level by level over presorted codes; see ``_fast_gbt``.
  Same scores as ``"gbt"`` up to rounding and tie-breaking (within ~0.005 on the benchmark),
  about 20x faster (benchmarks/bench_disentanglement_metrics.py).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from joblib import Parallel, delayed

from latentzoo.metrics.disentanglement._utils import ArrayLike, as_codes, as_factors

ESTIMATORS = ("gbt", "fast")


def _entropy(p: np.ndarray, base: float, axis: int) -> np.ndarray:
    """scipy.stats.entropy semantics: normalise along ``axis`` then -sum p log p / log base."""
    p = p / p.sum(axis=axis, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * np.log(p), 0.0)
    return -terms.sum(axis=axis) / np.log(base)


def _weighted_specificity(importance: np.ndarray, axis: int) -> float:
    """1 - entropy of each importance slice along ``axis`` (base = its length), weighted by the
    slice's share of the total importance; uniform weights when all importances are zero."""
    r = np.asarray(importance, dtype=np.float64)
    per_slice = 1.0 - _entropy(r + 1e-11, base=r.shape[axis], axis=axis)
    if r.sum() == 0.0:
        r = np.ones_like(r)
    return float(np.sum(per_slice * r.sum(axis=axis) / r.sum()))


def disentanglement(importance: np.ndarray) -> float:
    """DCI disentanglement of an importance matrix (codes x factors); dlib ``disentanglement``:
    how much each code concentrates on one factor."""
    return _weighted_specificity(importance, axis=1)


def completeness(importance: np.ndarray) -> float:
    """DCI completeness of an importance matrix (codes x factors); dlib ``completeness``: how much
    each factor is captured by one code."""
    return _weighted_specificity(importance, axis=0)


# --------------------------------------------------------------------------------------------
# Per-factor fits: each returns (importance over codes, train accuracy, test accuracy).


def _fit_gbt(
    x: np.ndarray, y: np.ndarray, xt: np.ndarray, yt: np.ndarray, random_state: int
) -> tuple[np.ndarray, float, float]:
    from sklearn.ensemble import GradientBoostingClassifier

    model = GradientBoostingClassifier(random_state=random_state)
    model.fit(x, y)
    return (
        np.abs(model.feature_importances_),
        float(np.mean(model.predict(x) == y)),
        float(np.mean(model.predict(xt) == yt)),
    )


def _fit_fast(
    x: np.ndarray, y: np.ndarray, xt: np.ndarray, yt: np.ndarray
) -> tuple[np.ndarray, float, float]:
    try:
        from latentzoo.metrics.disentanglement._fast_gbt import fit_fast_gbt
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "DCI estimator 'fast' needs numba (`pip install latentzoo[metrics-fast]`); "
            "estimator='gbt' is the canonical, slower alternative"
        ) from err
    return fit_fast_gbt(x, y, xt, yt)


def importance_matrix(
    codes_train: ArrayLike,
    factors_train: ArrayLike,
    codes_test: ArrayLike,
    factors_test: ArrayLike,
    estimator: str = "gbt",
    random_state: int = 0,
    n_jobs: int | None = None,
    factor_order: Sequence[int] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Importance matrix R (codes x factors) and per-factor train / test accuracies.

    One classifier per factor, fitted in parallel (``n_jobs`` defaults to the number of CPUs;
    joblib processes for sklearn, threads for the numba estimator), factors with many classes
    first so the workers stay balanced.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown DCI estimator {estimator!r}; choose from {ESTIMATORS}")
    x = as_codes(codes_train).astype(np.float64)
    y = as_factors(factors_train, x.shape[0])
    xt = as_codes(codes_test).astype(np.float64)
    yt = as_factors(factors_test, xt.shape[0])
    num_factors = y.shape[1]
    if factor_order is None:
        factor_order = np.argsort([-len(np.unique(y[:, k])) for k in range(num_factors)])
    n_jobs = n_jobs or min(num_factors, os.cpu_count() or 1)
    if estimator == "gbt":  # one process per factor (sklearn's trees hold the GIL)
        results = Parallel(n_jobs=n_jobs)(
            delayed(_fit_gbt)(x, y[:, k], xt, yt[:, k], random_state) for k in factor_order
        )
    else:  # one thread per factor: numba releases the GIL, and no barrier between factors
        with ThreadPoolExecutor(max_workers=n_jobs) as pool:
            results = list(pool.map(lambda k: _fit_fast(x, y[:, k], xt, yt[:, k]), factor_order))
    r = np.zeros((x.shape[1], num_factors))
    acc_train = np.zeros(num_factors)
    acc_test = np.zeros(num_factors)
    for k, (imp, a_tr, a_te) in zip(factor_order, results, strict=True):
        r[:, k], acc_train[k], acc_test[k] = imp, a_tr, a_te
    return r, acc_train, acc_test


def dci(
    codes_train: ArrayLike,
    factors_train: ArrayLike,
    codes_test: ArrayLike,
    factors_test: ArrayLike,
    estimator: str = "gbt",
    random_state: int = 0,
    n_jobs: int | None = None,
) -> dict[str, float]:
    """DCI scores; returns ``{"disentanglement", "completeness", "informativeness_train",
    "informativeness_test"}``.

    ``estimator="gbt"`` is dlib's canonical sklearn GBT; ``"fast"`` is the same algorithm in
    numba, an explicit alternative described in the module docstring. ``random_state`` seeds
    the sklearn GBT (the fast estimator is deterministic).
    """
    r, acc_train, acc_test = importance_matrix(
        codes_train,
        factors_train,
        codes_test,
        factors_test,
        estimator,
        random_state,
        n_jobs,
    )
    return {
        "disentanglement": disentanglement(r),
        "completeness": completeness(r),
        "informativeness_train": float(np.mean(acc_train)),
        "informativeness_test": float(np.mean(acc_test)),
    }
