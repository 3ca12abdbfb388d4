"""Ground-truth factor datasets: a finite grid of generative factors, one image per grid cell.

`FactorDataset` is the common interface of dSprites, 3D Shapes, Falcor3D, Isaac3D and the
procedural ``proc_*`` sets (see ``shared/specs/datasets.md`` §0). A dataset is a full factorial
grid with ``prod(factor_sizes)`` cells; the flat index of a cell is the mixed-radix number of its
factor classes with the **last factor varying fastest** (dSprites' and 3D Shapes' own order), so
``index = factors @ factor_bases``.

Subclasses provide the grid (``factor_names``, ``factor_sizes``, optionally ``factor_values``) and
the batched renderer/loader ``images_of``. Everything else (index arithmetic, sampling, items,
batches) lives here and is vectorised, so that batch samplers and collate functions can fetch a
whole batch with one call to ``get_batch`` instead of one ``__getitem__`` per item.

Conventions used across latentzoo:

- Two index spaces exist. *Grid indices* (``index_of`` / ``factors_of``) address the full grid.
  *Positions* (``__getitem__`` / ``get_batch`` / ``__len__``) address this dataset object, which
  may be restricted to a subset of the grid via ``indices`` (e.g. a train/val split); position
  ``i`` maps to grid index ``self.indices[i]``. Without a subset both coincide.
- Images are float32 in [0, 1], channels first. Factor classes are int64.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

IndexLike = int | np.integer | np.ndarray | torch.Tensor | Sequence[int]

__all__ = ["FactorDataset", "IndexLike"]


def _as_int64_array(x: Any, what: str) -> np.ndarray:
    """Convert python/numpy/torch integers (scalar or batch) to an int64 numpy array."""
    if isinstance(x, torch.Tensor):
        if x.is_floating_point() or x.is_complex():
            raise TypeError(f"{what} must be integers, got a {x.dtype} tensor")
        return x.detach().cpu().numpy().astype(np.int64, copy=False)
    arr = np.asarray(x)
    if arr.dtype == np.bool_ or not (
        np.issubdtype(arr.dtype, np.integer) or (arr.size == 0 and arr.dtype == np.float64)
    ):
        raise TypeError(f"{what} must be integers, got dtype {arr.dtype}")
    return arr.astype(np.int64, copy=False)


class FactorDataset(Dataset[tuple[torch.Tensor, torch.Tensor]], abc.ABC):
    """Abstract dataset over a full factorial grid of ground-truth factors.

    Subclasses set ``factor_names``, ``factor_sizes`` and ``image_shape`` (as class attributes or
    in ``__init__`` before use) and implement :meth:`images_of`. Override :attr:`factor_values`
    to give display values for :meth:`values_of`.

    Items are ``(image float32 (C, H, W), factor classes int64 (K,))``.
    """

    #: Name of each factor, in grid order (the last one varies fastest).
    factor_names: tuple[str, ...] = ()
    #: Number of classes of each factor, in grid order.
    factor_sizes: tuple[int, ...] = ()
    #: Image shape (C, H, W).
    image_shape: tuple[int, int, int] = (1, 64, 64)
    #: Images are a function of the grid cell: reading draws no random numbers, so a loader
    #: may render batches ahead in a thread (data.resumable, prefetch).
    draws_random = False

    def __init__(self, indices: IndexLike | None = None) -> None:
        """Optionally restrict the dataset to the grid indices ``indices`` (a split/subset)."""
        super().__init__()
        self._indices: np.ndarray | None = None
        if indices is not None:
            self._indices = self._checked_grid_indices(_as_int64_array(indices, "indices"))
            self._indices = np.ascontiguousarray(self._indices.reshape(-1))

    # ------------------------------------------------------------------ grid arithmetic
    @property
    def num_factors(self) -> int:
        """Number of factors K."""
        return len(self.factor_sizes)

    @property
    def num_grid(self) -> int:
        """Number of cells in the full grid, prod(factor_sizes)."""
        return int(np.prod(np.asarray(self.factor_sizes, dtype=np.int64)))

    @property
    def factor_bases(self) -> np.ndarray:
        """Mixed-radix bases, prod(sizes) / cumprod(sizes), int64 (K,); last factor fastest."""
        sizes = np.asarray(self.factor_sizes, dtype=np.int64)
        return np.prod(sizes) // np.cumprod(sizes)

    @property
    def indices(self) -> np.ndarray | None:
        """Grid indices of this (subset) dataset, or ``None`` when it spans the whole grid."""
        return self._indices

    def _checked_grid_indices(self, index: np.ndarray) -> np.ndarray:
        n = self.num_grid
        if index.size and (index.min() < 0 or index.max() >= n):
            raise IndexError(f"grid index out of range [0, {n})")
        return index

    def factors_of(self, index: IndexLike) -> np.ndarray:
        """Factor classes of grid indices: shape ``index.shape + (K,)``, int64.

        A scalar index gives a (K,) vector; a batch of N gives (N, K).
        """
        idx = self._checked_grid_indices(_as_int64_array(index, "index"))
        sizes = np.asarray(self.factor_sizes, dtype=np.int64)
        return (idx[..., None] // self.factor_bases) % sizes

    def index_of(self, factors: IndexLike) -> np.ndarray:
        """Grid indices of factor classes ``(..., K)``: shape ``factors.shape[:-1]``, int64."""
        f = self._checked_factors(_as_int64_array(factors, "factors"))
        return np.asarray(f @ self.factor_bases)

    def _checked_factors(self, f: np.ndarray) -> np.ndarray:
        if f.ndim == 0 or f.shape[-1] != self.num_factors:
            raise ValueError(f"factors must have shape (..., {self.num_factors}), got {f.shape}")
        sizes = np.asarray(self.factor_sizes, dtype=np.int64)
        if f.size and ((f < 0).any() or (f >= sizes).any()):
            raise ValueError(f"factor classes out of range for sizes {tuple(self.factor_sizes)}")
        return f

    def sample_factors(self, n: int, rng: np.random.Generator | int | None = None) -> np.ndarray:
        """Draw ``n`` factor vectors (n, K) int64, each factor uniform and independent.

        Samples the full grid (as disentanglement metrics require), not the subset.
        ``rng`` may be a Generator or a seed.
        """
        gen = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
        sizes = np.asarray(self.factor_sizes, dtype=np.int64)
        return gen.integers(0, sizes, size=(int(n), self.num_factors), dtype=np.int64)

    def sample_sharing(
        self,
        n: int,
        group_size: int,
        shared: Sequence[int] | np.ndarray,
        rng: np.random.Generator | int | None = None,
    ) -> np.ndarray:
        """Draw ``n`` groups of ``group_size`` factor vectors, (n, group_size, K) int64, whose
        factors ``shared`` are equal within a group while the others are drawn independently.

        ``shared`` is either one list of factor indices for every group, or a boolean mask
        (n, K) choosing them per group. This is the sampling behind the beta-VAE and FactorVAE
        scores and weakly-supervised pairs (Locatello et al. 2020); ``images_of`` on the
        flattened result gives the images.
        """
        gen = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
        groups = self.sample_factors(int(n) * int(group_size), gen)
        groups = groups.reshape(int(n), int(group_size), self.num_factors)
        mask = np.asarray(shared)
        if mask.dtype != bool:
            indices = mask.astype(np.int64)
            mask = np.zeros((int(n), self.num_factors), dtype=bool)
            mask[:, indices] = True
        if mask.shape != (int(n), self.num_factors):
            raise ValueError(f"shared mask must have shape ({n}, {self.num_factors})")
        # copy the first member's shared factors to the whole group
        groups = np.where(mask[:, None, :], groups[:, :1, :], groups)
        return groups

    # ------------------------------------------------------------------ values and images
    @property
    def factor_values(self) -> tuple[np.ndarray, ...]:
        """Value grid of each factor (float64). Default: the class indices themselves."""
        return tuple(np.arange(s, dtype=np.float64) for s in self.factor_sizes)

    def values_of(self, factors: IndexLike) -> np.ndarray:
        """Display values (float64, same shape as ``factors``) of factor classes ``(..., K)``."""
        f = self._checked_factors(_as_int64_array(factors, "factors"))
        out = np.empty(f.shape, dtype=np.float64)
        for k, grid in enumerate(self.factor_values):
            out[..., k] = np.asarray(grid, dtype=np.float64)[f[..., k]]
        return out

    @abc.abstractmethod
    def images_of(self, factors: IndexLike) -> torch.Tensor:
        """Images of factor classes (N, K) as float32 (N, C, H, W) in [0, 1] (batched)."""

    # ------------------------------------------------------------------ Dataset protocol
    def __len__(self) -> int:
        """Number of items: the subset size, or prod(factor_sizes)."""
        return int(self._indices.size) if self._indices is not None else self.num_grid

    def grid_index(self, positions: IndexLike) -> np.ndarray:
        """Map dataset positions (negative allowed) to grid indices, int64, same shape."""
        pos = _as_int64_array(positions, "positions")
        n = len(self)
        if pos.size and (pos.min() < -n or pos.max() >= n):
            raise IndexError(f"position out of range for dataset of length {n}")
        pos = np.where(pos < 0, pos + n, pos)
        return self._indices[pos] if self._indices is not None else pos

    def get_batch(self, positions: IndexLike) -> tuple[torch.Tensor, torch.Tensor]:
        """Batched items: images float32 (N, C, H, W) and factor classes int64 (N, K)."""
        factors = self.factors_of(self.grid_index(positions).reshape(-1))
        return self.images_of(factors), torch.from_numpy(factors)

    def __getitem__(self, i: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Item ``i`` -> (image (C, H, W), factors (K,)); a slice/sequence gives a batch."""
        if isinstance(i, slice):
            return self.get_batch(np.arange(len(self))[i])
        pos = _as_int64_array(i, "position")
        if pos.ndim == 0:
            images, factors = self.get_batch(pos.reshape(1))
            return images[0], factors[0]
        return self.get_batch(pos)

    def __getitems__(self, positions: Sequence[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Batched fetch for ``DataLoader`` auto-collation: renders once, returns item list."""
        images, factors = self.get_batch(np.asarray(positions, dtype=np.int64))
        return list(zip(images.unbind(0), factors.unbind(0), strict=True))

    def __repr__(self) -> str:
        grid = ", ".join(
            f"{n}={s}" for n, s in zip(self.factor_names, self.factor_sizes, strict=True)
        )
        return f"{type(self).__name__}(len={len(self)}, {grid}, image_shape={self.image_shape})"
