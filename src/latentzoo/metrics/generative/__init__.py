"""Generative metrics: FID (Heusel et al. 2017), KID (Bińkowski et al. 2018) and batch-1 NFE.

Protocol (metrics.md §12, latent_fm.md §9): images in [0, 1] -> uint8 by rounding; features of
the TF Inception-v3 2015-12-05 (pool3, 2048-d) after the TF1-compatible bilinear resize to 299
(no antialias) and (x - 128) / 128; float64 statistics; TF32 off in the feature pass.

Modules, by concern: ``imaging`` (uint8, TF1 resize, batch unpacking), ``extractors``
(Inception / tiny), ``reference`` (reference statistics: computation, cache, foreign files),
``metric`` (the FID/KID state and its DDP reduction), ``generation`` (sharded, seeded sampling
with a precision option), ``writers`` (saved samples), ``evaluators`` (eval.py's metric sets).
"""

from latentzoo.metrics.generative.evaluators import FIDEvaluator, NFEEvaluator, use_reference
from latentzoo.metrics.generative.extractors import (
    TinyFeatureExtractor,
    TorchFidelityInception,
    TorchScriptInception,
    _fid_helper_file,  # noqa: F401  (tests import it from here)
    build_feature_extractor,
)
from latentzoo.metrics.generative.generation import generate, generate_into, sample_labels
from latentzoo.metrics.generative.imaging import batch_images, resize_bilinear_tf1, to_uint8
from latentzoo.metrics.generative.metric import GenerativeMetrics, frechet_distance
from latentzoo.metrics.generative.progress import dist_info, progress_bar
from latentzoo.metrics.generative.reference import ReferenceStats, reference_stats, settings_hash

_progress = progress_bar  # the name metrics.classification imports

__all__ = [
    "FIDEvaluator",
    "GenerativeMetrics",
    "NFEEvaluator",
    "ReferenceStats",
    "TinyFeatureExtractor",
    "TorchFidelityInception",
    "TorchScriptInception",
    "batch_images",
    "build_feature_extractor",
    "dist_info",
    "frechet_distance",
    "generate",
    "generate_into",
    "progress_bar",
    "reference_stats",
    "resize_bilinear_tf1",
    "sample_labels",
    "settings_hash",
    "to_uint8",
    "use_reference",
]
