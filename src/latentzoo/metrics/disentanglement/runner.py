"""Run the disentanglement suite on an encoder and a ground-truth factor dataset.

Presets (``metrics.md`` §9): ``"dlib"`` (alias ``"default"``) are disentanglement_lib's
``unsupervised_study_v1`` sample sizes, ``"fast"`` the in-training / CPU sizes, ``"clg"`` the
CLG-VAE comparison settings. Only the canonical preset reports plain ``<metric>/<score>`` keys;
the others prefix theirs (``fast/mig/mig``, ``clg/sap/sap_continuous``), so that numbers of
different protocols never share a name in a log, a ``metrics.json`` or a table.

Randomness follows dlib, where every metric is a separate evaluation with
``evaluation.random_seed = 0``: each metric starts a fresh metric RNG from ``seed``, draws its
train set then its test set from it, and then draws its sklearn ``random_state``. Metrics with
equal sample sizes therefore see the same samples, so those are encoded only once.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from latentzoo.metrics.disentanglement._utils import draw_random_state
from latentzoo.metrics.disentanglement.beta_vae import beta_vae_score
from latentzoo.metrics.disentanglement.dci import dci
from latentzoo.metrics.disentanglement.factor_vae import factor_vae_score
from latentzoo.metrics.disentanglement.mig import mig
from latentzoo.metrics.disentanglement.modularity import modularity_explicitness
from latentzoo.metrics.disentanglement.sampling import (
    EncodeFn,
    FactorDataset,
    resolve_factor_indices,
    sample_codes_and_factors,
)
from latentzoo.metrics.disentanglement.sap import sap
from latentzoo.metrics.disentanglement.unsupervised import unsupervised

METRICS = ("beta_vae", "factor_vae", "mig", "dci", "sap", "modularity", "unsupervised")

_DLIB: dict[str, dict[str, Any]] = {
    "beta_vae": {"batch_size": 64, "num_train": 10000, "num_eval": 5000, "classifier": "default"},
    "factor_vae": {
        "batch_size": 64,
        "num_train": 10000,
        "num_eval": 5000,
        "num_variance_estimate": 10000,
        "threshold": 0.05,
    },
    "mig": {"num_train": 10000, "num_bins": 20},
    "dci": {"num_train": 10000, "num_test": 5000, "estimator": "gbt"},
    "sap": {"num_train": 10000, "num_test": 5000, "continuous_factors": False},
    "modularity": {"num_train": 10000, "num_test": 5000, "num_bins": 20, "legacy_ovr": False},
    "unsupervised": {"num_train": 10000, "num_bins": 20},
}


def _preset(
    base: dict[str, dict[str, Any]], **changes: dict[str, Any]
) -> dict[str, dict[str, Any]]:
    out = copy.deepcopy(base)
    for name, kw in changes.items():
        out[name].update(kw)
    return out


PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "dlib": _DLIB,
    "fast": _preset(
        _DLIB,
        beta_vae={"num_train": 1000, "num_eval": 500},
        factor_vae={"num_train": 1000, "num_eval": 500, "num_variance_estimate": 2000},
        mig={"num_train": 2000},
        # sklearn's GBT algorithm in numba: same scores to ~0.005, ~20x faster
        dci={"num_train": 2000, "num_test": 1000, "estimator": "fast"},
        sap={"num_train": 2000, "num_test": 1000},
        modularity={"num_train": 2000, "num_test": 1000},
        unsupervised={"num_train": 2000},
    ),
    "clg": _preset(
        _DLIB,
        beta_vae={"batch_size": 5, "num_train": 1000, "num_eval": 1000, "classifier": "clg"},
        factor_vae={"threshold": 0.1},
        mig={"num_train": 1000, "drop_first_factor": True},
        dci={"num_train": 1000, "num_test": 1000},
        sap={"num_train": 1000, "num_test": 1000, "continuous_factors": True},
        modularity={"num_train": 1000, "num_test": 1000},
        unsupervised={"num_train": 1000},
    ),
}
PRESETS["default"] = PRESETS["dlib"]


def key_prefix(preset: str) -> str:
    """``""`` for the canonical (dlib) preset, else ``"<preset>/"``: the keys never collide."""
    return "" if PRESETS.get(preset) is PRESETS["dlib"] else f"{preset}/"


def preset_record(
    preset: str, seed: int, overrides: Mapping[str, Mapping[str, Any]] | None = None
) -> dict[str, Any]:
    """What a score depends on besides the model: preset, per-metric sample sizes and settings
    (with ``overrides`` applied), and the metric seed (written to eval's ``metrics.json``)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    config = _preset(PRESETS[preset], **{k: dict(v) for k, v in (overrides or {}).items()})
    return {"preset": preset, "key_prefix": key_prefix(preset), "seed": seed, "settings": config}


class _SampleCache:
    """Train / test draws of fresh metric RNGs seeded with ``seed``, encoded once per size."""

    def __init__(
        self,
        encode: EncodeFn,
        dataset: FactorDataset,
        seed: int,
        factor_idx: np.ndarray,
        batch_size: int,
    ) -> None:
        self.encode, self.dataset, self.seed = encode, dataset, seed
        self.factor_idx, self.batch_size = factor_idx, batch_size
        self._train: dict[int, tuple[np.ndarray, np.ndarray, dict]] = {}
        self._test: dict[tuple[int, int], tuple[np.ndarray, np.ndarray, dict]] = {}

    def _draw(self, num: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, dict]:
        codes, factors = sample_codes_and_factors(
            self.encode, self.dataset, num, rng, self.batch_size, self.factor_idx
        )
        return codes, factors, copy.deepcopy(rng.bit_generator.state)

    def train(self, num: int) -> tuple[np.ndarray, np.ndarray, np.random.Generator]:
        if num not in self._train:
            self._train[num] = self._draw(num, np.random.default_rng(self.seed))
        codes, factors, state = self._train[num]
        return codes, factors, _generator_from(state)

    def train_test(
        self, num_train: int, num_test: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.random.Generator]:
        codes, factors, rng = self.train(num_train)
        key = (num_train, num_test)
        if key not in self._test:
            self._test[key] = self._draw(num_test, rng)
        codes_t, factors_t, state = self._test[key]
        return codes, factors, codes_t, factors_t, _generator_from(state)


def _generator_from(state: dict) -> np.random.Generator:
    bit_generator = getattr(np.random, state["bit_generator"])()
    bit_generator.state = copy.deepcopy(state)
    return np.random.Generator(bit_generator)


def evaluate_all(
    encode: EncodeFn,
    dataset: FactorDataset,
    preset: str = "default",
    seed: int = 0,
    metrics: Sequence[str] = METRICS,
    factor_indices: Sequence[int] | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    encode_batch_size: int = 2048,
    n_jobs: int | None = None,
) -> dict[str, float]:
    """Compute ``metrics`` with the sample sizes of ``preset``; keys are ``"<metric>/<score>"``
    (canonical preset) or ``"<preset>/<metric>/<score>"`` (see :func:`key_prefix`).

    ``factor_indices`` selects the factors (default: every factor with more than one value, e.g.
    dSprites without colour). ``overrides`` updates preset entries per metric, e.g.
    ``{"dci": {"estimator": "lightgbm"}}``. ``encode`` should be the deterministic posterior
    mean of a model in eval mode; it is called under ``torch.no_grad``.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"unknown metrics {unknown}; choose from {METRICS}")
    bad = [m for m in (overrides or {}) if m not in METRICS]
    if bad:
        raise ValueError(f"overrides for unknown metrics {bad}; choose from {METRICS}")
    config = _preset(PRESETS[preset], **{k: dict(v) for k, v in (overrides or {}).items()})
    idx = resolve_factor_indices(dataset.factor_sizes, factor_indices)
    cache = _SampleCache(encode, dataset, seed, idx, encode_batch_size)
    out: dict[str, float] = {}
    for name in metrics:
        cfg = dict(config[name])
        if name == "beta_vae":
            scores = beta_vae_score(
                encode,
                dataset,
                seed,
                factor_indices=idx,
                encode_batch_size=encode_batch_size,
                **cfg,
            )
        elif name == "factor_vae":
            scores = factor_vae_score(
                encode,
                dataset,
                seed,
                factor_indices=idx,
                encode_batch_size=encode_batch_size,
                **cfg,
            )
        elif name in ("mig", "unsupervised"):
            codes, factors, _ = cache.train(cfg.pop("num_train"))
            if name == "unsupervised":
                scores = unsupervised(codes, **cfg)
            else:
                if cfg.pop("drop_first_factor", False):
                    factors = factors[:, 1:]
                scores = mig(codes, factors, **cfg)
        else:
            c, f, ct, ft, rng = cache.train_test(cfg.pop("num_train"), cfg.pop("num_test"))
            random_state = draw_random_state(rng)
            if name == "dci":
                scores = dci(c, f, ct, ft, random_state=random_state, n_jobs=n_jobs, **cfg)
            elif name == "sap":
                scores = sap(c, f, ct, ft, random_state=random_state, n_jobs=n_jobs, **cfg)
                if cfg.get("continuous_factors"):  # a different score: its own name
                    scores = {"sap_continuous": scores["sap"]}
            else:
                scores = modularity_explicitness(
                    c, f, ct, ft, random_state=random_state, n_jobs=n_jobs, **cfg
                )
        prefix = key_prefix(preset)
        out.update({f"{prefix}{name}/{key}": float(value) for key, value in scores.items()})
    return out
