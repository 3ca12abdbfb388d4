"""Modularity and explicitness (Ridgeway & Mozer 2018, "Learning Deep Disentangled Embeddings
With the F-Statistic Loss").

Follows disentanglement_lib ``modularity_explicitness``:

* modularity: from the discrete MI matrix m (codes x factors, 20-bin histogram codes, train set),
  theta_i = max_k m_ik^2, delta_i = (sum_k m_ik^2 - theta_i) / (theta_i (K - 1)),
  modularity = mean_i (1 - delta_i), with 0 for a code whose MI is all zero;
* explicitness: codes z-scored with the training statistics, one logistic regression per factor
  on all codes, macro ROC-AUC of ``predict_proba`` against one-hot labels; mean over factors.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
from joblib import Parallel, delayed
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import roc_auc_score

from latentzoo.metrics.disentanglement._utils import (
    ArrayLike,
    as_codes,
    as_factors,
    discrete_mutual_info,
    histogram_discretize,
)
from latentzoo.metrics.disentanglement.beta_vae import make_logistic_regression


def modularity_from_mutual_info(m: np.ndarray) -> float:
    """Modularity score from an MI matrix m (codes x factors); dlib ``modularity``."""
    sq = np.square(np.asarray(m, dtype=np.float64))
    theta = sq.max(axis=1)
    num_factors = sq.shape[1]
    if num_factors < 2:
        raise ValueError("modularity needs at least 2 factors")
    with np.errstate(divide="ignore", invalid="ignore"):
        delta = (sq.sum(axis=1) - theta) / (theta * (num_factors - 1.0))
    score = np.where(theta == 0.0, 0.0, 1.0 - delta)
    return float(np.mean(score))


def _macro_auc(y: np.ndarray, proba: np.ndarray, classes: np.ndarray) -> float:
    """Macro ROC-AUC of one-vs-rest columns; columns without both labels are skipped.

    dlib one-hot encodes with ``MultiLabelBinarizer`` and would crash on a class absent from a
    split; on every split where dlib works this is the same number.
    """
    onehot = y[:, None] == classes[None, :]
    ok = onehot.any(axis=0) & ~onehot.all(axis=0)
    if not ok.any():
        return float("nan")
    return float(roc_auc_score(onehot[:, ok].astype(np.int64), proba[:, ok], average="macro"))


def _explicitness_factor(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    random_state: int,
    legacy_ovr: bool,
) -> tuple[float, float]:
    clf = make_logistic_regression(random_state, "legacy_ovr" if legacy_ovr else "default")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(x_train, y_train)
    classes = clf.classes_
    return (
        _macro_auc(y_train, clf.predict_proba(x_train), classes),
        _macro_auc(y_test, clf.predict_proba(x_test), classes),
    )


def modularity_explicitness(
    codes_train: ArrayLike,
    factors_train: ArrayLike,
    codes_test: ArrayLike,
    factors_test: ArrayLike,
    num_bins: int = 20,
    random_state: int = 0,
    legacy_ovr: bool = False,
    n_jobs: int | None = None,
) -> dict[str, float]:
    """Modularity and explicitness; returns ``{"modularity", "explicitness_train",
    "explicitness_test"}``.

    ``legacy_ovr=True`` fits liblinear one-vs-rest logistic regressions (sklearn < 0.22, what
    dlib ran); the default is modern lbfgs multinomial with ``max_iter=1000`` (spec §1 note).
    """
    c = as_codes(codes_train)
    f = as_factors(factors_train, c.shape[0])
    ct = as_codes(codes_test)
    ft = as_factors(factors_test, ct.shape[0])
    m = discrete_mutual_info(histogram_discretize(c, num_bins), f)
    scores = {"modularity": modularity_from_mutual_info(m)}

    x = c.astype(np.float64)
    mean, std = x.mean(axis=0), x.std(axis=0)
    std = np.where(std > 0, std, 1.0)  # dlib divides by zero for a constant code
    x = (x - mean) / std
    xt = (ct.astype(np.float64) - mean) / std
    n_jobs = n_jobs or min(f.shape[1], os.cpu_count() or 1)
    # one process per factor (lbfgs holds the GIL), many-class factors first
    order = np.argsort([-len(np.unique(f[:, k])) for k in range(f.shape[1])], kind="stable")
    res = Parallel(n_jobs=n_jobs)(
        delayed(_explicitness_factor)(x, f[:, k], xt, ft[:, k], random_state, legacy_ovr)
        for k in order
    )
    scores["explicitness_train"] = float(np.mean([r[0] for r in res]))
    scores["explicitness_test"] = float(np.mean([r[1] for r in res]))
    return scores
