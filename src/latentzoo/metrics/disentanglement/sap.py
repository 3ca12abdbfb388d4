"""SAP: Separated Attribute Predictability (Kumar et al. 2018, "Variational Inference of
Disentangled Latent Concepts from Unlabeled Observations", Sec. 3).

Follows disentanglement_lib ``sap_score``: a score matrix S (codes x factors) is filled with the
test accuracy of a ``LinearSVC(C=0.01, class_weight="balanced")`` predicting factor k from the
single code i (discrete factors, canonical), or with the squared correlation
cov(z_i, y_k)^2 / (var z_i var y_k) (``continuous_factors=True``, test set unused).
SAP = mean over factors of the gap between the two best codes.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
from joblib import Parallel, delayed
from sklearn.exceptions import ConvergenceWarning
from sklearn.svm import LinearSVC

from latentzoo.metrics.disentanglement._utils import ArrayLike, as_codes, as_factors, top_two_gap


def _svc_column(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    random_state: int,
) -> np.ndarray:
    """Test accuracy of a 1-D LinearSVC per code dimension, for one factor."""
    out = np.zeros(x_train.shape[1])
    for i in range(x_train.shape[1]):
        clf = LinearSVC(C=0.01, class_weight="balanced", dual="auto", random_state=random_state)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            clf.fit(x_train[:, i : i + 1], y_train)
        out[i] = np.mean(clf.predict(x_test[:, i : i + 1]) == y_test)
    return out


def sap_score_matrix(
    codes_train: ArrayLike,
    factors_train: ArrayLike,
    codes_test: ArrayLike | None = None,
    factors_test: ArrayLike | None = None,
    continuous_factors: bool = False,
    random_state: int = 0,
    n_jobs: int | None = None,
) -> np.ndarray:
    """SAP score matrix S (codes x factors); see the module docstring."""
    x = as_codes(codes_train).astype(np.float64)
    y = as_factors(factors_train, x.shape[0])
    if continuous_factors:
        xc = x - x.mean(axis=0)
        yc = (y - y.mean(axis=0)).astype(np.float64)
        n1 = x.shape[0] - 1
        cov = xc.T @ yc / n1
        var_x = np.sum(xc**2, axis=0) / n1
        var_y = np.sum(yc**2, axis=0) / n1
        with np.errstate(divide="ignore", invalid="ignore"):
            s = cov**2 / (var_x[:, None] * var_y[None, :])
        return np.where(var_x[:, None] > 1e-12, s, 0.0)
    if codes_test is None or factors_test is None:
        raise ValueError("discrete SAP needs a test set")
    xt = as_codes(codes_test).astype(np.float64)
    yt = as_factors(factors_test, xt.shape[0])
    n_jobs = n_jobs or min(y.shape[1], os.cpu_count() or 1)
    # One process per factor, many-class factors first so the workers stay balanced.
    order = np.argsort([-len(np.unique(y[:, k])) for k in range(y.shape[1])], kind="stable")
    cols = Parallel(n_jobs=n_jobs)(
        delayed(_svc_column)(x, y[:, k], xt, yt[:, k], random_state) for k in order
    )
    s = np.zeros((x.shape[1], y.shape[1]))
    for k, col in zip(order, cols, strict=True):
        s[:, k] = col
    return s


def sap(
    codes_train: ArrayLike,
    factors_train: ArrayLike,
    codes_test: ArrayLike | None = None,
    factors_test: ArrayLike | None = None,
    continuous_factors: bool = False,
    random_state: int = 0,
    n_jobs: int | None = None,
) -> dict[str, float]:
    """SAP score (dlib ``compute_sap``); returns ``{"sap"}``.

    Discrete (canonical): LinearSVC test accuracies. ``continuous_factors=True``: squared
    correlations on the training set (the CLG-VAE variant).
    """
    s = sap_score_matrix(
        codes_train,
        factors_train,
        codes_test,
        factors_test,
        continuous_factors,
        random_state,
        n_jobs,
    )
    return {"sap": float(np.mean(top_two_gap(s)))}
