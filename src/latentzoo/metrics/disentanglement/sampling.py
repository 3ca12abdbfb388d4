"""Sampling ground-truth factors, rendering and encoding them in large batches.

The factor-dataset protocol (``datasets.md``; disentanglement_lib's ``GroundTruthData``):

* ``dataset.factor_sizes``: tuple of ints;
* ``dataset.sample_factors(n, rng: np.random.Generator) -> (n, K) int64``, each factor uniform and
  independent;
* ``dataset.images_of(factors) -> torch float (n, C, H, W)``.

``encode(images) -> (n, D)`` tensor or array is the deterministic representation (posterior mean).
All factor draws of a metric happen up front, so the encoder batch size never changes a result.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from latentzoo.metrics.disentanglement._utils import to_numpy

if TYPE_CHECKING:  # torch is imported lazily so joblib workers of the array metrics stay light
    import torch

EncodeFn = Callable[["torch.Tensor"], Any]


class FactorDataset(Protocol):
    """What the sampled metrics need from a ground-truth dataset."""

    factor_sizes: Sequence[int]

    def sample_factors(self, n: int, rng: np.random.Generator) -> np.ndarray: ...

    def images_of(self, factors: np.ndarray) -> torch.Tensor: ...  # noqa: F821


def as_generator(rng: np.random.Generator | int | None) -> np.random.Generator:
    """The metric RNG: a Generator is used as is, an int (the metric seed) seeds a new one."""
    if isinstance(rng, np.random.Generator):
        return rng
    return np.random.default_rng(0 if rng is None else rng)


def resolve_factor_indices(
    factor_sizes: Sequence[int], factor_indices: Sequence[int] | None = None
) -> np.ndarray:
    """Indices of the factors the metrics use; default: every factor with more than one value.

    dSprites carries a colour factor of size 1, which dlib's ``dsprites_full`` excludes.
    """
    sizes = [int(s) for s in factor_sizes]
    if factor_indices is None:
        idx = [k for k, s in enumerate(sizes) if s > 1]
    else:
        idx = [int(k) for k in factor_indices]
        bad = [k for k in idx if not 0 <= k < len(sizes)]
        if bad:
            raise ValueError(f"factor_indices {bad} out of range for {len(sizes)} factors")
    if not idx:
        raise ValueError("no factor left to evaluate")
    return np.asarray(idx, dtype=np.int64)


def encode_factors(
    encode: EncodeFn, dataset: FactorDataset, factors: np.ndarray, batch_size: int = 2048
) -> np.ndarray:
    """Render and encode the rows of ``factors`` (M, K) in forward passes of ``batch_size``."""
    import torch

    factors = np.asarray(factors)
    chunks = []
    with torch.no_grad():
        for start in range(0, factors.shape[0], batch_size):
            images = dataset.images_of(factors[start : start + batch_size])
            z = to_numpy(encode(images))
            chunks.append(z.reshape(z.shape[0], -1))
    if not chunks:
        raise ValueError("nothing to encode")
    return np.concatenate(chunks, axis=0)


def sample_codes_and_factors(
    encode: EncodeFn,
    dataset: FactorDataset,
    num: int,
    rng: np.random.Generator | int,
    batch_size: int = 2048,
    factor_indices: Sequence[int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Draw ``num`` factor rows, render and encode them (dlib ``generate_batch_factor_code``).

    Returns ``(codes (num, D), factors (num, K'))`` with one row per sample; the factor columns
    are ``factor_indices`` (all columns when None).
    """
    rng = as_generator(rng)
    factors = np.asarray(dataset.sample_factors(num, rng), dtype=np.int64)
    codes = encode_factors(encode, dataset, factors, batch_size)
    if factor_indices is not None:
        factors = factors[:, np.asarray(factor_indices, dtype=np.int64)]
    return codes, factors
