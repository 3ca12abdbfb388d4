"""Unsupervised scores of disentanglement_lib (``unsupervised_metrics``), used in Locatello et
al. 2019, "Challenging Common Assumptions in the Unsupervised Learning of Disentangled
Representations".

From the code covariance Sigma (ddof 1):

* Gaussian total correlation, KL(N(0, Sigma) || N(0, diag Sigma)) =
  1/2 (sum_i log Sigma_ii - log det Sigma);
* Gaussian Wasserstein correlation, the squared W2 distance between N(0, Sigma) and
  N(0, diag Sigma): 2 tr Sigma - 2 tr sqrt(diag(Sigma) Sigma), and its version divided by tr Sigma;
* mutual-information score: mean off-diagonal discrete MI between pairs of 20-bin codes.
"""

from __future__ import annotations

import numpy as np

from latentzoo.metrics.disentanglement._utils import (
    ArrayLike,
    as_codes,
    discrete_mutual_info,
    histogram_discretize,
)


def gaussian_total_correlation(cov: np.ndarray) -> float:
    """Total correlation of a zero-mean Gaussian with covariance ``cov`` (nats).

    NaN when a code is constant (zero variance), as in dlib.
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        return float(0.5 * (np.sum(np.log(np.diag(cov))) - np.linalg.slogdet(cov)[1]))


def gaussian_wasserstein_correlation(cov: np.ndarray) -> float:
    """2 tr(cov) - 2 tr sqrtm(diag(cov) cov).

    diag(cov) cov is similar to the symmetric PSD matrix D^1/2 cov D^1/2, so the trace of its
    principal square root is the sum of square roots of that matrix's eigenvalues; this avoids
    the complex round-off of ``scipy.linalg.sqrtm`` that dlib calls.
    """
    d = np.sqrt(np.diag(cov))
    eig = np.linalg.eigvalsh(d[:, None] * cov * d[None, :])
    return float(2.0 * np.trace(cov) - 2.0 * np.sum(np.sqrt(np.clip(eig, 0.0, None))))


def unsupervised(codes: ArrayLike, num_bins: int = 20) -> dict[str, float]:
    """The unsupervised scores of ``codes`` (N, D); see the module docstring for the keys."""
    c = as_codes(codes)
    num_codes = c.shape[1]
    if num_codes < 2:
        raise ValueError("unsupervised scores need at least 2 code dimensions")
    cov = np.atleast_2d(np.cov(c.astype(np.float64), rowvar=False))
    gwc = gaussian_wasserstein_correlation(cov)
    disc = histogram_discretize(c, num_bins)
    mi = discrete_mutual_info(disc, disc)
    np.fill_diagonal(mi, 0.0)
    return {
        "gaussian_total_correlation": gaussian_total_correlation(cov),
        "gaussian_wasserstein_correlation": gwc,
        "gaussian_wasserstein_correlation_norm": gwc / float(np.trace(cov)),
        "mutual_info_score": float(mi.sum() / (num_codes**2 - num_codes)),
    }
