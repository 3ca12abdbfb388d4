"""beta-VAE score (Higgins et al. 2017, "beta-VAE: Learning Basic Visual Concepts with a
Constrained Variational Framework").

Follows disentanglement_lib ``beta_vae.compute_beta_vae_sklearn``. One point: draw a factor index
k uniformly, two factor batches of size b that share factor k, encode both; the feature is
mean_b |z1 - z2| and the label is k. A logistic regression is fitted on ``num_train`` points and
scored on ``num_eval`` fresh points. All pairs of many points go through the encoder together.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.multiclass import OneVsRestClassifier

from latentzoo.metrics.disentanglement._utils import draw_random_state
from latentzoo.metrics.disentanglement.sampling import (
    EncodeFn,
    FactorDataset,
    as_generator,
    encode_factors,
    resolve_factor_indices,
)

CLASSIFIERS = ("default", "legacy_ovr", "clg")


def make_logistic_regression(random_state: int, kind: str = "default") -> object:
    """The logistic regression of the beta-VAE score and of explicitness.

    * ``"default"``: modern sklearn defaults (lbfgs, multinomial) with ``max_iter=1000``;
    * ``"legacy_ovr"``: liblinear one-vs-rest, the sklearn < 0.22 default that dlib ran;
    * ``"clg"``: unpenalised multinomial newton-cg (CLG-VAE / UnsupervisedActionEstimation).
    """
    if kind == "default":
        return LogisticRegression(max_iter=1000, random_state=random_state)
    if kind == "legacy_ovr":
        return OneVsRestClassifier(
            LogisticRegression(solver="liblinear", random_state=random_state)
        )
    if kind == "clg":
        # unpenalised: C = inf (sklearn >= 1.8 spelling of the removed penalty=None)
        return LogisticRegression(C=np.inf, solver="newton-cg", random_state=random_state)
    raise ValueError(f"unknown logistic regression kind {kind!r}; choose from {CLASSIFIERS}")


def _beta_vae_points(
    encode: EncodeFn,
    dataset: FactorDataset,
    factor_idx: np.ndarray,
    batch_size: int,
    num_points: int,
    rng: np.random.Generator,
    encode_batch_size: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Features (num_points, D) and labels (positions in ``factor_idx``) of beta-VAE points."""
    num_factors = len(dataset.factor_sizes)
    labels = rng.integers(len(factor_idx), size=num_points)
    f1 = np.asarray(dataset.sample_factors(num_points * batch_size, rng), dtype=np.int64)
    f2 = np.asarray(dataset.sample_factors(num_points * batch_size, rng), dtype=np.int64)
    f1 = f1.reshape(num_points, batch_size, num_factors)
    f2 = f2.reshape(num_points, batch_size, num_factors)
    rows = np.arange(num_points)[:, None]
    cols = factor_idx[labels][:, None]
    f2[rows, np.arange(batch_size)[None, :], cols] = f1[rows, np.arange(batch_size)[None, :], cols]
    # Interleave the pairs so a chunk of points is one contiguous block of images.
    pairs = np.stack([f1, f2], axis=1).reshape(-1, num_factors)
    z = encode_factors(encode, dataset, pairs, encode_batch_size)
    z = z.reshape(num_points, 2, batch_size, -1).astype(np.float64)
    features = np.mean(np.abs(z[:, 0] - z[:, 1]), axis=1)
    return features, labels


def beta_vae_score(
    encode: EncodeFn,
    dataset: FactorDataset,
    rng: np.random.Generator | int = 0,
    batch_size: int = 64,
    num_train: int = 10000,
    num_eval: int = 5000,
    factor_indices: Sequence[int] | None = None,
    classifier: str = "default",
    encode_batch_size: int = 2048,
) -> dict[str, float]:
    """beta-VAE score; returns ``{"train_accuracy", "eval_accuracy"}`` (eval is the reported one).

    ``rng`` is the metric RNG or seed (dlib ``evaluation.random_seed = 0``); ``factor_indices``
    selects the factors (default: all with more than one value); ``classifier`` is one of
    ``CLASSIFIERS`` (see :func:`make_logistic_regression`).
    """
    rng = as_generator(rng)
    idx = resolve_factor_indices(dataset.factor_sizes, factor_indices)
    x_train, y_train = _beta_vae_points(
        encode, dataset, idx, batch_size, num_train, rng, encode_batch_size
    )
    model = make_logistic_regression(draw_random_state(rng), classifier)
    model.fit(x_train, y_train)
    train_acc = float(np.mean(model.predict(x_train) == y_train))
    x_eval, y_eval = _beta_vae_points(
        encode, dataset, idx, batch_size, num_eval, rng, encode_batch_size
    )
    eval_acc = float(np.mean(model.predict(x_eval) == y_eval))
    return {"train_accuracy": train_acc, "eval_accuracy": eval_acc}
