"""3D Shapes (Burgess & Kim 2018) read from DeepMind's official ``3dshapes.h5``.

File ``3dshapes.h5`` (about 255 MB, Apache-2.0) from the Google Cloud Storage bucket ``3d-shapes``
(linked from https://github.com/deepmind/3d-shapes), keys (``shared/specs/datasets.md`` §2):
``images`` (480000, 64, 64, 3) uint8 and ``labels`` (480000, 6) float64 factor *values*.

Factors floor_hue 10, wall_hue 10, object_hue 10 (values 0 ... 0.9), scale 8 (0.75 ... 1.25),
shape 4 (0 ... 3), orientation 15 (-30 ... 30), orientation fastest. Classes come from the flat
index, never from rounding the float labels (the CLG Downstream metric broke that way); loading
checks that the labels really are that grid, and ``values_of`` returns the file's own values.

Two access modes:

- ``in_memory=True`` (default): the images are read once, in large contiguous slices with a
  progress bar, into a uint8 array (5.9 GB); batches gather from it and convert to float.
- ``in_memory=False``: the file is re-chunked once to one image per chunk
  (``3dshapes.chunk1.h5`` next to it, or in ``cache_dir``; uncompressed, 5.9 GB) and batches are
  read lazily from that copy, one raw chunk per image: a random per-image read then touches one
  small chunk instead of a block of images (pitfall (b) of spec §1; disent's approach). The HDF5
  handle is opened per process, so forked or spawned DataLoader workers each get their own.
  The copy is written to a temporary file and renamed, so ranks of a multi-process run that
  build it at the same time do not corrupt it (build it once beforehand to save the work).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from tqdm.auto import tqdm

from latentzoo.data.datasets.download import download_url, publish_file
from latentzoo.data.datasets.dsprites import _grid_sizes
from latentzoo.data.datasets.errors import DatasetFormatError, DatasetNotFoundError, file_start
from latentzoo.data.datasets.factors import FactorDataset, IndexLike, _as_int64_array

__all__ = ["Shapes3D"]

_CACHE_VERSION = 1


class Shapes3D(FactorDataset):
    """3D Shapes from the official h5: items (image float32 (3, 64, 64) in [0, 1], classes (6,)).

    Args:
        root: folder holding ``3dshapes.h5``.
        download: fetch the file from Google Cloud Storage when it is missing.
        in_memory: load all images (uint8, 5.9 GB) at construction; otherwise read each batch
            lazily from a one-image-per-chunk copy of the file.
        cache_dir: folder of that copy (default: ``root``); only used with ``in_memory=False``.
        checksum: expected checksum of a downloaded file (``"md5:<hex>"``); None skips the check.
        read_block: images per contiguous read while loading or re-chunking.
        progress: show progress bars; None shows them only on a terminal.
        factor_sizes: override of the grid sizes, for test files and sub-grids that hold a smaller
            full factorial grid in the same factor order; None means the official grid.
        indices: optional grid indices restricting the dataset to a subset (see FactorDataset).
    """

    FILENAME = "3dshapes.h5"
    CACHE_FILENAME = "3dshapes.chunk1.h5"
    URL = "https://storage.googleapis.com/3d-shapes/3dshapes.h5"
    #: MD5 of the official file (267,573,662 bytes), as published by several independent loaders
    #: (disent, latte, vaetc); DeepMind publishes none.
    CHECKSUM = "md5:099a2078d58cec4daad0702c55d06868"
    FULL_SIZES: tuple[int, ...] = (10, 10, 10, 8, 4, 15)

    factor_names = ("floor_hue", "wall_hue", "object_hue", "scale", "shape", "orientation")
    image_shape = (3, 64, 64)
    shape_names = ("cube", "cylinder", "sphere", "capsule")

    def __init__(
        self,
        root: str | Path,
        download: bool = False,
        in_memory: bool = True,
        cache_dir: str | Path | None = None,
        checksum: str | None = CHECKSUM,
        read_block: int = 10_000,
        progress: bool | None = None,
        factor_sizes: Sequence[int] | None = None,
        indices: IndexLike | None = None,
    ) -> None:
        self.root = Path(root).expanduser()
        self.path = self.root / self.FILENAME
        self.factor_sizes = _grid_sizes(factor_sizes, self.FULL_SIZES, "Shapes3D")
        self.in_memory = bool(in_memory)
        self.read_block = max(1, int(read_block))
        self.progress = progress
        super().__init__(indices)
        if not self.path.is_file():
            if not download:
                raise DatasetNotFoundError(
                    "3D Shapes",
                    self.path,
                    expected=f"the file {self.FILENAME} (255 MB)",
                    source=f"{self.URL} (e.g. `wget -P {self.root} {self.URL}`)",
                    download_override="data.dataset.download=true",
                )
            download_url(self.URL, self.path, checksum=checksum, name="3D Shapes")
        self._imgs: np.ndarray | None = None
        self._h5: h5py.File | None = None
        self._h5_pid: int | None = None
        self._values = self._load_labels()
        if self.in_memory:
            self._imgs = self._load_images()
            self.cache_path: Path | None = None
        else:
            cache_root = Path(cache_dir).expanduser() if cache_dir is not None else self.root
            self.cache_path = cache_root / self.CACHE_FILENAME
            if not self._cache_is_valid():
                self._build_cache()

    # ------------------------------------------------------------------ loading and checks
    def _open_source(self) -> h5py.File:
        try:
            return h5py.File(self.path, "r")
        except OSError as error:
            problem = h5_problem(self.path, error)
            raise DatasetFormatError(f"cannot open {self.path}: {problem}") from error

    @contextlib.contextmanager
    def _reading(self, what: str) -> Iterator[None]:
        """Name the file and the damage when a read fails (a bad compressed chunk)."""
        try:
            yield
        except OSError as error:
            raise DatasetFormatError(
                f"{self.path}: cannot read {what} ({error}): the file is damaged; delete it and "
                "download it again (data.dataset.download=true)"
            ) from error

    def _check_source(self, f: h5py.File) -> tuple[h5py.Dataset, h5py.Dataset]:
        """The ``images`` and ``labels`` datasets, after checking keys, shapes, dtype and count."""
        missing = {"images", "labels"} - set(f.keys())
        if missing:
            raise DatasetFormatError(f"{self.path}: missing datasets {sorted(missing)}")
        images, labels = f["images"], f["labels"]
        h, w = self.image_shape[1:]
        if images.ndim != 4 or images.shape[1:] != (h, w, 3) or images.dtype != np.uint8:
            raise DatasetFormatError(
                f"{self.path}: images must be uint8 (N, {h}, {w}, 3), "
                f"got {images.dtype} {images.shape}"
            )
        n = self.num_grid
        if images.shape[0] != n:
            raise DatasetFormatError(
                f"{self.path} holds {images.shape[0]} images but the factor grid "
                f"{tuple(self.factor_sizes)} needs prod = {n}; the file is truncated or not "
                "the official 3dshapes.h5"
            )
        if labels.shape != (n, self.num_factors):
            raise DatasetFormatError(
                f"{self.path}: labels must be ({n}, {self.num_factors}), got {labels.shape}"
            )
        return images, labels

    def _load_labels(self) -> tuple[np.ndarray, ...]:
        """Check that the labels form the full grid (orientation fastest); return the value grid."""
        with self._open_source() as f, self._reading("labels"):
            _, labels_ds = self._check_source(f)
            labels = np.asarray(labels_ds[...], dtype=np.float64)
        classes = self.factors_of(np.arange(self.num_grid))
        bases = self.factor_bases
        values = []
        for k, size in enumerate(self.factor_sizes):
            grid = labels[np.arange(size) * bases[k], k]
            spacing = np.diff(np.sort(grid)).min() if size > 1 else 1.0
            expected = grid[classes[:, k]]
            if spacing <= 0 or np.abs(labels[:, k] - expected).max() > 1e-3 * spacing:
                raise DatasetFormatError(
                    f"{self.path}: labels[:, {k}] ({self.factor_names[k]}) do not follow the "
                    f"factor grid {tuple(self.factor_sizes)} with orientation fastest"
                )
            values.append(grid.copy())
        return tuple(values)

    def _blocks(self, n: int, desc: str) -> Any:
        starts = range(0, n, self.read_block)
        disable = None if self.progress is None else not self.progress
        return tqdm(starts, desc=desc, unit="block", disable=disable)

    def _load_images(self) -> np.ndarray:
        """Read all images into uint8 (N, 64, 64, 3) in large contiguous slices."""
        with self._open_source() as f:
            images, _ = self._check_source(f)
            n = images.shape[0]
            out = np.empty(images.shape, dtype=np.uint8)
            for start in self._blocks(n, f"loading {self.FILENAME}"):
                sel = np.s_[start : min(n, start + self.read_block)]
                with self._reading(f"images[{sel.start}:{sel.stop}]"):
                    images.read_direct(out, source_sel=sel, dest_sel=sel)
        return out

    def _source_signature(self) -> dict[str, int]:
        stat = self.path.stat()
        return {
            "version": _CACHE_VERSION,
            "num_images": self.num_grid,
            "source_size": stat.st_size,
            "source_mtime_ns": stat.st_mtime_ns,
        }

    def _cache_is_valid(self) -> bool:
        assert self.cache_path is not None
        if not self.cache_path.is_file():
            return False
        try:
            with h5py.File(self.cache_path, "r") as f:
                attrs = {key: int(f.attrs.get(key, -1)) for key in self._source_signature()}
                images = f.get("images")
                ok = (
                    images is not None
                    and images.chunks == (1, *images.shape[1:])
                    and images.compression is None
                )
        except OSError:
            return False
        return ok and attrs == self._source_signature()

    def _build_cache(self) -> None:
        """Copy the images into a one-image-per-chunk HDF5 file (temp file, then rename)."""
        assert self.cache_path is not None
        self.cache_path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(
            prefix=f".{self.cache_path.name}.", suffix=".part", dir=self.cache_path.parent
        )
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            with self._open_source() as src, h5py.File(tmp, "w") as dst:
                images, _ = self._check_source(src)
                n = images.shape[0]
                out = dst.create_dataset(
                    "images", shape=images.shape, dtype=np.uint8, chunks=(1, *images.shape[1:])
                )
                for start in self._blocks(n, f"re-chunking {self.FILENAME}"):
                    sel = np.s_[start : min(n, start + self.read_block)]
                    with self._reading(f"images[{sel.start}:{sel.stop}]"):
                        out[sel] = images[sel]
                dst.attrs.update(self._source_signature())
            publish_file(tmp, self.cache_path)
        finally:
            tmp.unlink(missing_ok=True)

    # ------------------------------------------------------------------ lazy handle
    def _lazy_images(self) -> h5py.Dataset:
        """The cache's ``images`` dataset, opened once per process (h5py handles do not fork)."""
        if self._h5 is None or self._h5_pid != os.getpid():
            assert self.cache_path is not None
            self._h5 = h5py.File(self.cache_path, "r")
            self._h5_pid = os.getpid()
        return self._h5["images"]

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_h5"], state["_h5_pid"] = None, None
        return state

    def close(self) -> None:
        """Close the lazily opened cache file (reopened on the next batch)."""
        if self._h5 is not None:
            self._h5.close()
            self._h5, self._h5_pid = None, None

    # ------------------------------------------------------------------ values and images
    @property
    def factor_values(self) -> tuple[np.ndarray, ...]:
        """The file's own value grid (labels): hues 0..0.9, scale 0.75..1.25, ... (float64)."""
        return self._values

    def images_hwc_of(self, factors: IndexLike) -> np.ndarray:
        """Images of factor classes (N, 6) as stored: uint8 (N, 64, 64, 3), in the given order."""
        f = self._checked_factors(_as_int64_array(factors, "factors"))
        idx = self.index_of(f.reshape(-1, self.num_factors))
        if self._imgs is not None:
            return self._imgs[idx]
        if idx.size == 0:
            return np.empty((0, *self.image_shape[1:], 3), dtype=np.uint8)
        # Read the sorted unique images (sequential-ish on disk), then restore the requested
        # order and duplicates.
        unique, inverse = np.unique(idx, return_inverse=True)
        return self._read_lazy(unique)[inverse.reshape(-1)]

    def _read_lazy(self, sorted_indices: np.ndarray) -> np.ndarray:
        """Read images by index from the one-image-per-chunk cache, one raw chunk each.

        Each image is one uncompressed chunk, so ``read_direct_chunk`` returns its bytes without
        HDF5's selection machinery: about 25k images/s from the page cache, where h5py fancy
        indexing (``ds[sorted_indices]``) managed about 450/s on the full set.
        """
        images = self._lazy_images()
        out = np.empty((len(sorted_indices), *images.shape[1:]), dtype=np.uint8)
        flat = out.reshape(len(sorted_indices), -1)
        dataset_id = images.id
        for j, i in enumerate(sorted_indices.tolist()):
            _, raw = dataset_id.read_direct_chunk((i, 0, 0, 0))
            flat[j] = np.frombuffer(raw, dtype=np.uint8)
        return out

    def images_u8_of(self, factors: IndexLike) -> torch.Tensor:
        """Images of factor classes (N, 6) as uint8 (N, 3, 64, 64)."""
        return torch.from_numpy(self.images_hwc_of(factors)).permute(0, 3, 1, 2).contiguous()

    def images_of(self, factors: IndexLike) -> torch.Tensor:
        """Images of factor classes (N, 6) as float32 (N, 3, 64, 64) in [0, 1]."""
        return self.images_u8_of(factors).to(torch.float32).div_(255.0)

    def __repr__(self) -> str:
        mode = "in_memory" if self.in_memory else f"lazy:{self.cache_path}"
        return f"Shapes3D(root={str(self.root)!r}, len={len(self)}, {mode})"


HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def h5_problem(path: Path, error: OSError) -> str:
    """Why an HDF5 file did not open: not HDF5 at all, locked by a writer, or damaged."""
    with path.open("rb") as file:
        head = file.read(len(HDF5_SIGNATURE))
    if head != HDF5_SIGNATURE:  # (the official file has no user block before the signature)
        return f"it is not an HDF5 file ({file_start(path)}); delete it and download it again"
    if "lock" in str(error).lower():
        return (
            f"{error}; if another process is still writing it, wait for it to finish; on file "
            "systems without locking (NFS) set HDF5_USE_FILE_LOCKING=FALSE"
        )
    return f"the HDF5 file is damaged or truncated ({error}); delete it and download it again"
