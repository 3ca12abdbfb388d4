"""FactorVAE score (Kim & Mnih 2018, "Disentangling by Factorising").

Follows disentanglement_lib ``factor_vae.compute_factor_vae``:

1. global per-code variances (ddof 1) over ``num_variance_estimate`` random images; codes with
   std >= ``threshold`` are active (0.05 in dlib's ``unsupervised_study_v1`` configs);
2. one vote: pick factor k uniformly, draw b factor rows sharing the value of factor k, encode,
   d* = argmin over active codes of local variance (ddof 1) / global variance; votes[k, d*] += 1;
3. majority-vote classifier code d -> argmax_k train_votes[k, d]; accuracy = fraction of votes
   that agree with it, on the train and on the eval votes.

``num_active_dims`` is the number of active codes (dlib reports ``len`` of the boolean mask,
i.e. always the code size; fixed here).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from latentzoo.metrics.disentanglement.sampling import (
    EncodeFn,
    FactorDataset,
    as_generator,
    encode_factors,
    resolve_factor_indices,
)


def _factor_vae_votes(
    encode: EncodeFn,
    dataset: FactorDataset,
    factor_idx: np.ndarray,
    batch_size: int,
    num_points: int,
    rng: np.random.Generator,
    global_var: np.ndarray,
    active: np.ndarray,
    encode_batch_size: int,
) -> np.ndarray:
    """Vote matrix (len(factor_idx), D) of ``num_points`` FactorVAE votes."""
    num_factors = len(dataset.factor_sizes)
    labels = rng.integers(len(factor_idx), size=num_points)
    f = np.asarray(dataset.sample_factors(num_points * batch_size, rng), dtype=np.int64)
    f = f.reshape(num_points, batch_size, num_factors)
    cols = factor_idx[labels]
    rows = np.arange(num_points)
    f[rows[:, None], np.arange(batch_size)[None, :], cols[:, None]] = f[rows, 0, cols][:, None]
    z = encode_factors(encode, dataset, f.reshape(-1, num_factors), encode_batch_size)
    z = z.reshape(num_points, batch_size, -1).astype(np.float64)
    local_var = np.var(z, axis=1, ddof=1)
    active_idx = np.flatnonzero(active)
    best = active_idx[np.argmin(local_var[:, active_idx] / global_var[active_idx], axis=1)]
    votes = np.zeros((len(factor_idx), z.shape[2]), dtype=np.int64)
    np.add.at(votes, (labels, best), 1)
    return votes


def _vote_accuracy(votes: np.ndarray, classifier: np.ndarray) -> float:
    return float(votes[classifier, np.arange(votes.shape[1])].sum() / votes.sum())


def factor_vae_score(
    encode: EncodeFn,
    dataset: FactorDataset,
    rng: np.random.Generator | int = 0,
    batch_size: int = 64,
    num_train: int = 10000,
    num_eval: int = 5000,
    num_variance_estimate: int = 10000,
    threshold: float = 0.05,
    factor_indices: Sequence[int] | None = None,
    encode_batch_size: int = 2048,
) -> dict[str, float]:
    """FactorVAE score; returns ``{"train_accuracy", "eval_accuracy", "num_active_dims"}``.

    All scores are 0 when no code is active. The number of codes need not equal the number of
    factors.
    """
    rng = as_generator(rng)
    idx = resolve_factor_indices(dataset.factor_sizes, factor_indices)
    f_var = np.asarray(dataset.sample_factors(num_variance_estimate, rng), dtype=np.int64)
    z_var = encode_factors(encode, dataset, f_var, encode_batch_size).astype(np.float64)
    global_var = np.var(z_var, axis=0, ddof=1)
    active = (np.sqrt(global_var) >= threshold) & (global_var > 0)
    if not active.any():
        return {"train_accuracy": 0.0, "eval_accuracy": 0.0, "num_active_dims": 0.0}
    args = (encode, dataset, idx, batch_size)
    train_votes = _factor_vae_votes(*args, num_train, rng, global_var, active, encode_batch_size)
    classifier = np.argmax(train_votes, axis=0)
    eval_votes = _factor_vae_votes(*args, num_eval, rng, global_var, active, encode_batch_size)
    return {
        "train_accuracy": _vote_accuracy(train_votes, classifier),
        "eval_accuracy": _vote_accuracy(eval_votes, classifier),
        "num_active_dims": float(active.sum()),
    }
