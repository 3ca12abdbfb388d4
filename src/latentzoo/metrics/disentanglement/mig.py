"""Mutual Information Gap (Chen et al. 2018, "Isolating Sources of Disentanglement in VAEs").

Follows disentanglement_lib ``mig.compute_mig``: each code dimension is discretised into
``num_bins`` equal-width bins over its observed range, m[i, k] is the discrete mutual information
between code bin i and factor class k (nats), and

    MIG = mean_k (m_(1),k - m_(2),k) / H_k

with H_k the empirical entropy of the *sampled* factor k. Note: a factor with more values than
``num_bins`` (dSprites orientation 40, positions 32 with 20 bins) cannot reach a gap of 1, because
I(bin; factor) <= log(num_bins) < H_k.
"""

from __future__ import annotations

import numpy as np

from latentzoo.metrics.disentanglement._utils import (
    ArrayLike,
    as_codes,
    as_factors,
    discrete_entropy,
    discrete_mutual_info,
    histogram_discretize,
    top_two_gap,
)


def mig_from_mutual_info(m: np.ndarray, entropy: np.ndarray) -> float:
    """MIG from an MI matrix m (codes x factors) and the factor entropies (nats)."""
    if np.any(entropy <= 0):
        raise ValueError(
            "MIG is undefined for a constant factor (zero entropy); drop it via factor_indices"
        )
    return float(np.mean(top_two_gap(m) / entropy))


def mig(codes: ArrayLike, factors: ArrayLike, num_bins: int = 20) -> dict[str, float]:
    """Discrete MIG of ``codes`` (N, D) against integer ``factors`` (N, K); returns ``{"mig"}``.

    Invariant to permuting and (positively or negatively) rescaling code dimensions, since the
    histogram discretisation only depends on each dimension's own range.
    """
    c = as_codes(codes)
    f = as_factors(factors, c.shape[0])
    m = discrete_mutual_info(histogram_discretize(c, num_bins), f)
    return {"mig": mig_from_mutual_info(m, discrete_entropy(f))}
