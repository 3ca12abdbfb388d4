"""Falcor3D and Isaac3D (NVIDIA, CC BY 4.0) from a prepared uint8 ``.npy`` array.

The official sets (https://github.com/NVlabs/High-res-disentanglement-datasets) are folders of
``images/<index zero-padded to 6 digits>.png`` shared on Google Drive, a manual download because
Drive quotas make automatic fetches unreliable (``shared/specs/datasets.md`` §3). ``prepare``
converts such a folder, once, into one memory-mappable uint8 array (N, H, W, 3) in sorted
file-name order (latent-flow relies on it), optionally downsampled::

    python -m latentzoo.data.datasets.nvidia3d prepare --name falcor3d \\
        --src <unzipped>/images --out <data_dir>/falcor3d/falcor3d_128.npy --resolution 128

The datasets then open ``<root>/<name>_<resolution>.npy`` with ``np.load(mmap_mode="r")`` (or load
it into memory) and gather each batch from it. Forked DataLoader workers share the mapping.

Grids (last factor fastest; factor values uniformly spaced in [0, 1]):

- Falcor3D, 233,280 renders of a living room: lighting_intensity 5, lighting_x-dir 6,
  lighting_y-dir 6, lighting_z-dir 6, camera_x-pos 6, camera_y-pos 6, camera_z-pos 6.
- Isaac3D, 737,280 renders of a kitchen with a robot arm, in the order of the official demo
  script (the README's list contradicts its own index bases): object_shape 3, robot_x-move 8,
  robot_y-move 5, camera_height 4, object_scale 4, lighting_intensity 4, lighting_y-dir 6,
  object_color 4, wall_color 4.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from latentzoo.data.datasets.download import publish_file
from latentzoo.data.datasets.dsprites import _grid_sizes
from latentzoo.data.datasets.errors import DatasetFormatError, DatasetNotFoundError, file_start
from latentzoo.data.datasets.factors import FactorDataset, IndexLike, _as_int64_array
from latentzoo.utils.errors import LatentzooError

__all__ = ["DATASETS", "Falcor3D", "Isaac3D", "NvidiaFactorDataset", "main", "prepare"]

SOURCE = "https://github.com/NVlabs/High-res-disentanglement-datasets"
_PNG_SUFFIXES = (".png",)


class NvidiaFactorDataset(FactorDataset):
    """A prepared NVIDIA high-resolution disentanglement set: items (image (3, R, R), classes).

    Args:
        root: folder holding ``<name>_<resolution>.npy`` (written by ``prepare``).
        resolution: image side of the prepared array (128 for the official downsampled zips).
        in_memory: load the whole array into RAM instead of memory-mapping it.
        filename: the array's file name, if not ``<name>_<resolution>.npy``.
        factor_sizes: override of the grid sizes, for test files and sub-grids that hold a smaller
            full factorial grid in the same factor order; None means the official grid.
        indices: optional grid indices restricting the dataset to a subset (see FactorDataset).
    """

    NAME: ClassVar[str] = ""
    DISPLAY: ClassVar[str] = ""
    FULL_SIZES: ClassVar[tuple[int, ...]] = ()
    ARCHIVE_HINT: ClassVar[str] = ""

    def __init__(
        self,
        root: str | Path,
        resolution: int = 128,
        in_memory: bool = False,
        filename: str | None = None,
        factor_sizes: Sequence[int] | None = None,
        indices: IndexLike | None = None,
    ) -> None:
        self.root = Path(root).expanduser()
        self.resolution = int(resolution)
        self.path = self.root / (filename or f"{self.NAME}_{self.resolution}.npy")
        self.factor_sizes = _grid_sizes(factor_sizes, self.FULL_SIZES, self.DISPLAY)
        self.image_shape = (3, self.resolution, self.resolution)
        self.in_memory = bool(in_memory)
        super().__init__(indices)
        if not self.path.is_file():
            raise DatasetNotFoundError(
                self.DISPLAY,
                self.path,
                expected=(
                    f"a uint8 array ({self.num_grid}, {self.resolution}, {self.resolution}, 3) "
                    f"written by `prepare` from the official PNG folder"
                ),
                source=f"{SOURCE} (manual Google Drive download: {self.ARCHIVE_HINT})",
                prepare=(
                    f"python -m latentzoo.data.datasets.nvidia3d prepare --name {self.NAME} "
                    f"--src <unzipped folder>/images --out {self.path} "
                    f"--resolution {self.resolution}"
                ),
            )
        self._images = self._open()

    def _open(self) -> np.ndarray:
        """Memory-map (or load) the array and check dtype, shape and count."""
        try:
            images = np.load(self.path, mmap_mode=None if self.in_memory else "r")
        except (OSError, ValueError) as error:
            with self.path.open("rb") as file:
                is_npy = file.read(6) == b"\x93NUMPY"
            # numpy calls any non-.npy file "pickled data": say what it really is instead
            what = str(error) if is_npy else f"it is not a .npy file ({file_start(self.path)})"
            raise DatasetFormatError(
                f"cannot read {self.path} as a .npy array: {what}; re-run prepare"
            ) from error
        want = (self.num_grid, self.resolution, self.resolution, 3)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != want[1:]:
            raise DatasetFormatError(
                f"{self.path}: expected uint8 {want}, got {images.dtype} {images.shape} "
                "(re-run prepare, or set data.dataset.resolution to the array's size)"
            )
        if images.shape[0] != self.num_grid:
            raise DatasetFormatError(
                f"{self.path} holds {images.shape[0]} images but the factor grid "
                f"{tuple(self.factor_sizes)} needs prod = {self.num_grid}"
            )
        return images

    def __getstate__(self) -> dict[str, Any]:
        """Pickle without the memory map (spawned workers re-map the file instead of copying)."""
        state = self.__dict__.copy()
        if not self.in_memory:
            state["_images"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        if self._images is None:
            self._images = self._open()

    @property
    def factor_values(self) -> tuple[np.ndarray, ...]:
        """Factor values uniformly spaced in [0, 1] (as in the official labels)."""
        return tuple(np.linspace(0.0, 1.0, s) if s > 1 else np.zeros(1) for s in self.factor_sizes)

    def images_hwc_of(self, factors: IndexLike) -> np.ndarray:
        """Images of factor classes (N, K) as stored: uint8 (N, R, R, 3), in the given order."""
        f = self._checked_factors(_as_int64_array(factors, "factors"))
        return np.asarray(self._images[self.index_of(f.reshape(-1, self.num_factors))])

    def images_u8_of(self, factors: IndexLike) -> torch.Tensor:
        """Images of factor classes (N, K) as uint8 (N, 3, R, R)."""
        return torch.from_numpy(self.images_hwc_of(factors)).permute(0, 3, 1, 2).contiguous()

    def images_of(self, factors: IndexLike) -> torch.Tensor:
        """Images of factor classes (N, K) as float32 (N, 3, R, R) in [0, 1]."""
        return self.images_u8_of(factors).to(torch.float32).div_(255.0)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(path={str(self.path)!r}, len={len(self)})"


class Falcor3D(NvidiaFactorDataset):
    """Falcor3D: 233,280 living-room renders; 7 factors (lighting, camera position)."""

    NAME = "falcor3d"
    DISPLAY = "Falcor3D"
    FULL_SIZES = (5, 6, 6, 6, 6, 6, 6)
    ARCHIVE_HINT = "the 128x128 zip (3.7 GB) or the full 1024x1024 set (98 GB)"
    factor_names = (
        "lighting_intensity",
        "lighting_x-dir",
        "lighting_y-dir",
        "lighting_z-dir",
        "camera_x-pos",
        "camera_y-pos",
        "camera_z-pos",
    )


class Isaac3D(NvidiaFactorDataset):
    """Isaac3D: 737,280 kitchen/robot-arm renders; 9 factors in the demo script's order."""

    NAME = "isaac3d"
    DISPLAY = "Isaac3D"
    FULL_SIZES = (3, 8, 5, 4, 4, 4, 6, 4, 4)
    ARCHIVE_HINT = "the 128x128 zip (13 GB) or the full 512x512 set (190 GB)"
    factor_names = (
        "object_shape",
        "robot_x-move",
        "robot_y-move",
        "camera_height",
        "object_scale",
        "lighting_intensity",
        "lighting_y-dir",
        "object_color",
        "wall_color",
    )


DATASETS: dict[str, type[NvidiaFactorDataset]] = {"falcor3d": Falcor3D, "isaac3d": Isaac3D}


# ---------------------------------------------------------------------- prepare
def _png_files(src: Path) -> list[Path]:
    """PNG files of ``src`` (or of ``src/images``), sorted by file name."""
    if not src.is_dir():
        raise DatasetNotFoundError(
            "PNG folder",
            src,
            expected="a folder of <index zero-padded to 6 digits>.png files",
            source=f"{SOURCE} (unzip the downloaded archive first)",
        )
    folder = src / "images" if (src / "images").is_dir() else src
    return sorted(
        (p for p in folder.iterdir() if p.suffix.lower() in _PNG_SUFFIXES and p.is_file()),
        key=lambda p: p.name,
    )


def _read_png(path: Path, resolution: int | None) -> np.ndarray:
    """Decode one PNG to uint8 (H, W, 3), area-downsampled to ``resolution`` if given."""
    with Image.open(path) as image:
        rgb = image.convert("RGB")
    if resolution is not None and rgb.size != (resolution, resolution):
        if rgb.width < resolution or rgb.height < resolution:
            raise DatasetFormatError(
                f"{path} is {rgb.width}x{rgb.height}, smaller than --resolution {resolution}"
            )
        rgb = rgb.resize((resolution, resolution), Image.Resampling.BOX)
    return np.asarray(rgb, dtype=np.uint8)


def prepare(
    name: str,
    src: str | Path,
    out: str | Path,
    resolution: int | None = None,
    factor_sizes: Sequence[int] | None = None,
    workers: int | None = None,
    progress: bool | None = None,
) -> Path:
    """Convert a Falcor3D/Isaac3D PNG folder into one uint8 ``.npy`` array (N, R, R, 3).

    Checks that the number of PNGs equals the product of the factor sizes (and, when the names
    are numbers, that they are exactly 0 ... N-1); index order = sorted file names. Images are
    decoded in a thread pool and written into a memory-mapped temporary file that is renamed to
    ``out`` when complete. ``resolution`` downsamples with an area (box) filter; None keeps the
    native size. ``factor_sizes`` overrides the official grid (tests, sub-grids).
    """
    if name not in DATASETS:
        raise ValueError(f"name must be one of {sorted(DATASETS)}, got {name!r}")
    cls = DATASETS[name]
    sizes = _grid_sizes(factor_sizes, cls.FULL_SIZES, cls.DISPLAY)
    expected = int(np.prod(sizes))
    src, out = Path(src).expanduser(), Path(out).expanduser()
    files = _png_files(src)
    if len(files) != expected:
        raise DatasetFormatError(
            f"{src}: found {len(files)} PNG files but {cls.DISPLAY}'s factor grid {sizes} "
            f"needs prod = {expected}; is the download complete and unzipped?"
        )
    stems = [p.stem for p in files]
    if all(s.isdigit() for s in stems) and [int(s) for s in stems] != list(range(expected)):
        raise DatasetFormatError(
            f"{src}: numbered PNG names must be 0 ... {expected - 1} (zero-padded to equal width)"
        )
    first = _read_png(files[0], resolution)
    height, width, _ = first.shape
    if height != width:
        raise DatasetFormatError(f"{files[0]}: images must be square, got {width}x{height}")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.stem}.", suffix=".npy", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        array = np.lib.format.open_memmap(
            tmp, mode="w+", dtype=np.uint8, shape=(expected, height, width, 3)
        )
        n_workers = workers or min(8, os.cpu_count() or 1)
        disable = None if progress is None else not progress
        chunk = 64 * n_workers  # bounded number of decoded images in flight
        with (
            ThreadPoolExecutor(n_workers) as pool,
            tqdm(total=expected, desc=name, unit="img", disable=disable) as bar,
        ):
            for start in range(0, expected, chunk):
                batch = files[start : start + chunk]
                decoded: Iterator[np.ndarray] = pool.map(lambda f: _read_png(f, resolution), batch)
                for i, image in enumerate(decoded, start):
                    if image.shape != first.shape:
                        raise DatasetFormatError(
                            f"{files[i]}: shape {image.shape} differs from {files[0]} {first.shape}"
                        )
                    array[i] = image
                bar.update(len(batch))
        array.flush()
        del array
        publish_file(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def main(argv: list[str] | None = None) -> int:
    """Command line: ``python -m latentzoo.data.datasets.nvidia3d prepare ...``."""
    parser = argparse.ArgumentParser(prog="python -m latentzoo.data.datasets.nvidia3d")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="convert the official PNG folder into one uint8 .npy")
    p.add_argument("--name", choices=sorted(DATASETS), required=True)
    p.add_argument("--src", type=Path, required=True, help="folder of the PNGs (or its parent)")
    p.add_argument("--out", type=Path, required=True, help="output .npy file")
    p.add_argument("--resolution", type=int, default=None, help="e.g. 64 or 128; default native")
    p.add_argument("--workers", type=int, default=None, help="decoding threads")
    args = parser.parse_args(argv)
    try:
        out = prepare(args.name, args.src, args.out, args.resolution, workers=args.workers)
    except LatentzooError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
