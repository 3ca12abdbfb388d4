"""Writers for the generated samples (``save_samples``): PNG files named by global sample index,
and ``.npz`` files in ADM's evaluator format (uint8 NHWC ``arr_0``), one per rank under DDP."""

from __future__ import annotations

import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from latentzoo.utils.errors import LatentzooError

SAVE_MODES = (None, "png", "npz", "both")


class NpzWriter:
    """Streams uint8 NHWC batches into ``arr_0`` of an ``.npz`` without holding the whole
    array in memory; ``shape`` is the final array shape, written up front."""

    def __init__(self, path: Path, shape: tuple[int, ...]) -> None:
        self.zip = zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True)
        self.file = self.zip.open("arr_0.npy", "w", force_zip64=True)
        header = {"descr": "|u1", "fortran_order": False, "shape": shape}
        np.lib.format.write_array_header_2_0(self.file, header)

    def write(self, images: np.ndarray, indices: Sequence[int]) -> None:
        self.file.write(np.ascontiguousarray(images, dtype=np.uint8).tobytes())

    def close(self) -> None:
        self.file.close()
        self.zip.close()


class PngWriter:
    """``folder/<global index>.png``: every rank writes its own samples into one folder."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder

    def write(self, images: np.ndarray, indices: Sequence[int]) -> None:
        from PIL import Image

        for image, index in zip(images, indices, strict=True):
            Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image).save(
                self.folder / f"{index:06d}.png"
            )

    def close(self) -> None:
        pass


def sample_writers(
    mode: str | None,
    output_dir: Path,
    image_shape: Sequence[int],
    count: int,
    rank: int = 0,
    world_size: int = 1,
) -> list[NpzWriter | PngWriter]:
    """Writers for ``mode`` (png | npz | both | None); ``count`` is this rank's sample count.
    Under DDP the npz is ``samples_rank<r>of<w>.npz``; together they hold every sample once
    (concatenate them for ADM's evaluator; the PNG names are the global sample indices)."""
    if mode not in SAVE_MODES:
        raise LatentzooError(f"save_samples must be png, npz, both or null, not {mode!r}")
    writers: list[NpzWriter | PngWriter] = []
    if mode in ("npz", "both"):
        if len(image_shape) != 3:
            raise LatentzooError("save_samples=npz needs datamodule.image_shape [C, H, W]")
        output_dir.mkdir(parents=True, exist_ok=True)
        name = "samples.npz" if world_size == 1 else f"samples_rank{rank}of{world_size}.npz"
        c, h, w = image_shape
        writers.append(NpzWriter(output_dir / name, (count, h, w, c)))
    if mode in ("png", "both"):
        writers.append(PngWriter(output_dir / "samples"))
    return writers
