"""Disentanglement metrics following google-research/disentanglement_lib (``metrics.md``).

Array cores take codes (N, D) and integer factor classes (N, K), one row per sample (numpy
arrays or torch tensors), and return flat dicts of Python floats. The sampled scores
(beta-VAE, FactorVAE) and :func:`evaluate_all` take an ``encode`` function and a factor dataset
(``factor_sizes``, ``sample_factors(n, rng)``, ``images_of(factors)``).
"""

from latentzoo.metrics.disentanglement._utils import (
    discrete_entropy,
    discrete_mutual_info,
    histogram_discretize,
)
from latentzoo.metrics.disentanglement.beta_vae import beta_vae_score
from latentzoo.metrics.disentanglement.dci import (
    completeness,
    dci,
    disentanglement,
    importance_matrix,
)
from latentzoo.metrics.disentanglement.factor_vae import factor_vae_score
from latentzoo.metrics.disentanglement.mig import mig
from latentzoo.metrics.disentanglement.modularity import (
    modularity_explicitness,
    modularity_from_mutual_info,
)
from latentzoo.metrics.disentanglement.runner import (
    METRICS,
    PRESETS,
    evaluate_all,
    key_prefix,
    preset_record,
)
from latentzoo.metrics.disentanglement.sampling import (
    encode_factors,
    resolve_factor_indices,
    sample_codes_and_factors,
)
from latentzoo.metrics.disentanglement.sap import sap, sap_score_matrix
from latentzoo.metrics.disentanglement.unsupervised import unsupervised

__all__ = [
    "METRICS",
    "PRESETS",
    "beta_vae_score",
    "completeness",
    "dci",
    "discrete_entropy",
    "discrete_mutual_info",
    "disentanglement",
    "encode_factors",
    "evaluate_all",
    "key_prefix",
    "preset_record",
    "factor_vae_score",
    "histogram_discretize",
    "importance_matrix",
    "mig",
    "modularity_explicitness",
    "modularity_from_mutual_info",
    "resolve_factor_indices",
    "sample_codes_and_factors",
    "sap",
    "sap_score_matrix",
    "unsupervised",
]
