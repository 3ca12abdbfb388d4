"""dSprites (Matthey et al. 2017) read from DeepMind's official ``.npz`` file.

File ``dsprites_ndarray_co1sh3sc6or40x32y32_64x64.npz`` (about 26 MB, Apache-2.0) from
https://github.com/deepmind/dsprites-dataset, keys (``shared/specs/datasets.md`` §1):

- ``imgs`` (737280, 64, 64) uint8 in {0, 1};
- ``latents_values`` (737280, 6) float64 and ``latents_classes`` (737280, 6) int64;
- ``metadata``, a pickled Python-2 dict (not needed here, so never unpickled).

Factors (color 1, shape 3, scale 6, orientation 40, posX 32, posY 32) are those of
:class:`~latentzoo.data.datasets.ProcDSprites`, posY fastest. Loading checks that the file holds
the full grid in this order (its ``latents_classes`` equal the classes of the flat index), so items
can be addressed by index arithmetic alone.

Pitfalls handled (spec §1): every access to ``npz["imgs"]`` decompresses the whole 3 GB array, so
it is read **once** at construction into a plain uint8 array and batches gather from it (a).
``packed=True`` keeps the images bit-packed (377 MB) and unpacks per batch (c). Forked DataLoader
workers share the array's pages copy-on-write; nothing is copied per worker (d). Images stay
{0, 1}: ``images_of`` returns float {0, 1}, not /255 (f).
"""

from __future__ import annotations

import zipfile
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from latentzoo.data.datasets.download import download_url
from latentzoo.data.datasets.errors import DatasetFormatError, DatasetNotFoundError, file_start
from latentzoo.data.datasets.factors import FactorDataset, IndexLike, _as_int64_array

__all__ = ["DSprites"]


class DSprites(FactorDataset):
    """dSprites from the official npz: items (image float32 (1, 64, 64) in {0, 1}, classes (6,)).

    Args:
        root: folder holding ``dsprites_ndarray_co1sh3sc6or40x32y32_64x64.npz``.
        download: fetch the file from DeepMind's GitHub repository when it is missing.
        checksum: expected checksum of a downloaded file (``"md5:<hex>"``); None skips the check.
        packed: keep the images bit-packed in memory (8x smaller; unpacked per batch).
        factor_sizes: override of the grid sizes, for test files and sub-grids that hold a smaller
            full factorial grid in the same factor order; None means the official grid.
        indices: optional grid indices restricting the dataset to a subset (see FactorDataset).
    """

    FILENAME = "dsprites_ndarray_co1sh3sc6or40x32y32_64x64.npz"
    URL = f"https://github.com/deepmind/dsprites-dataset/raw/master/{FILENAME}"
    #: MD5 of the official file, as published by several independent loaders (disent, latte,
    #: vaetc, ...); the upstream repository itself publishes none.
    CHECKSUM = "md5:7da33b31b13a06f4b04a70402ce90c2e"
    FULL_SIZES: tuple[int, ...] = (1, 3, 6, 40, 32, 32)

    factor_names = ("color", "shape", "scale", "orientation", "posX", "posY")
    image_shape = (1, 64, 64)
    shape_names = ("square", "ellipse", "heart")

    def __init__(
        self,
        root: str | Path,
        download: bool = False,
        checksum: str | None = CHECKSUM,
        packed: bool = False,
        factor_sizes: Sequence[int] | None = None,
        indices: IndexLike | None = None,
    ) -> None:
        self.root = Path(root).expanduser()
        self.path = self.root / self.FILENAME
        self.factor_sizes = _grid_sizes(factor_sizes, self.FULL_SIZES, "DSprites")
        self.packed = bool(packed)
        super().__init__(indices)
        if not self.path.is_file():
            if not download:
                raise self._not_found()
            download_url(self.URL, self.path, checksum=checksum, name="dSprites")
        self._load()

    def _not_found(self) -> DatasetNotFoundError:
        return DatasetNotFoundError(
            "dSprites",
            self.path,
            expected=f"the file {self.FILENAME} (26 MB)",
            source=f"{self.URL} (e.g. `wget -P {self.root} {self.URL}`)",
            download_override="data.dataset.download=true",
        )

    def _load(self) -> None:
        """Decompress ``imgs`` once, check count/shape/order, read the value grid."""
        try:
            with np.load(self.path, allow_pickle=False) as npz:
                missing = {"imgs", "latents_classes", "latents_values"} - set(npz.files)
                if missing:
                    raise DatasetFormatError(
                        f"{self.path} is not the dSprites npz: missing keys {sorted(missing)}"
                    )
                imgs = np.asarray(npz["imgs"])
                classes = np.asarray(npz["latents_classes"])
                values = np.asarray(npz["latents_values"], dtype=np.float64)
        except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as error:
            raise DatasetFormatError(
                f"cannot read {self.path} as the dSprites npz: {npz_problem(self.path, error)}; "
                "delete it and download it again (data.dataset.download=true)"
            ) from error
        n = self.num_grid
        if imgs.ndim != 3 or imgs.shape[1:] != self.image_shape[1:]:
            raise DatasetFormatError(
                f"{self.path}: imgs must have shape (N, 64, 64), got {imgs.shape}"
            )
        if imgs.shape[0] != n:
            raise DatasetFormatError(
                f"{self.path} holds {imgs.shape[0]} images but the factor grid "
                f"{tuple(self.factor_sizes)} needs prod = {n}; the file is truncated or not "
                "the official dSprites npz"
            )
        k = self.num_factors
        if classes.shape != (n, k) or values.shape != (n, k):
            raise DatasetFormatError(
                f"{self.path}: latents_classes/latents_values must be ({n}, {k}), "
                f"got {classes.shape} / {values.shape}"
            )
        if not np.array_equal(classes, self.factors_of(np.arange(n))):
            raise DatasetFormatError(
                f"{self.path}: latents_classes are not the full grid in dSprites order "
                f"(sizes {tuple(self.factor_sizes)}, posY fastest)"
            )
        # Value of class c of factor k: the row whose only non-zero class is c along k.
        bases = self.factor_bases
        self._values = tuple(
            values[np.arange(size) * bases[j], j].copy() for j, size in enumerate(self.factor_sizes)
        )
        imgs = imgs.astype(np.uint8, copy=False)
        self._imgs = np.packbits(imgs, axis=-1) if self.packed else np.ascontiguousarray(imgs)

    @property
    def factor_values(self) -> tuple[np.ndarray, ...]:
        """The file's own value grid (latents_values): shape 1..3, scale 0.5..1, ... (float64)."""
        return self._values

    def images_u8_of(self, factors: IndexLike) -> torch.Tensor:
        """Images of factor classes (N, 6) (or one (6,)) as uint8 (N, 1, 64, 64) in {0, 1}."""
        f = self._checked_factors(_as_int64_array(factors, "factors"))
        idx = self.index_of(f.reshape(-1, self.num_factors))
        batch = self._imgs[idx]
        if self.packed:
            batch = np.unpackbits(batch, axis=-1, count=self.image_shape[2])
        return torch.from_numpy(batch).unsqueeze(1)

    def images_of(self, factors: IndexLike) -> torch.Tensor:
        """Images of factor classes (N, 6) as float32 (N, 1, 64, 64) in {0, 1}."""
        return self.images_u8_of(factors).to(torch.float32)

    def __repr__(self) -> str:
        return f"DSprites(root={str(self.root)!r}, len={len(self)}, packed={self.packed})"


def npz_problem(path: Path, error: BaseException) -> str:
    """What is wrong with an npz that failed to load (never numpy's allow_pickle advice: a
    file that is not a zip archive is simply not an npz)."""
    if not zipfile.is_zipfile(path):
        return f"it is not a complete npz (zip) archive ({file_start(path)})"
    if isinstance(error, zlib.error | zipfile.BadZipFile | EOFError):
        return f"a compressed array in it is damaged ({type(error).__name__}: {error})"
    return f"{type(error).__name__}: {error}"


def _grid_sizes(
    override: Sequence[int] | None, full: tuple[int, ...], name: str
) -> tuple[int, ...]:
    """The grid sizes: ``full``, or a validated override with as many factors."""
    if override is None:
        return full
    sizes = tuple(int(s) for s in override)
    if len(sizes) != len(full) or min(sizes) < 1:
        raise ValueError(
            f"{name}: factor_sizes needs {len(full)} positive sizes (like {full}), got {sizes}"
        )
    return sizes
