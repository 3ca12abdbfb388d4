"""Image folders: recursive listing, optional class-subfolder labels, PIL decode + crop/resize.

Items are ``(image uint8 [3, S, S], label int64)``; the datamodule's collate turns a batch into
float in [0, 1] (and flips it for training), so workers move 4x fewer bytes.
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from latentzoo.data.datasets.errors import BadSampleError, bad_sample, file_start

if TYPE_CHECKING:
    from latentzoo.data.bad_samples import BadSampleLog

__all__ = [
    "BAD_IMAGE_ERRORS",
    "IMAGE_EXTENSIONS",
    "ImageFolder",
    "describe_bad_image",
    "list_images",
    "load_image",
    "preprocess",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
_FILTERS = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
}
RESIZE_MODES = ("center_crop", "adm", "resize", "none")


# what PIL raises for a truncated, empty or damaged file (and preprocess for a wrong size)
BAD_IMAGE_ERRORS = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    zlib.error,
    struct.error,
    Image.DecompressionBombError,
)
MAX_REPLACEMENTS = 16  # on_bad_sample=skip: consecutive bad files tried before giving up


def describe_bad_image(path: Path | None, error: BaseException) -> str:
    """What is wrong with an image that failed to load, in a few words."""
    if path is not None and path.is_file() and path.stat().st_size == 0:
        return "the file is empty (0 bytes)"
    if isinstance(error, UnidentifiedImageError):
        return "not an image PIL can read" + (f": {file_start(path)}" if path else "")
    return f"cannot decode it ({type(error).__name__}: {error})"


def list_images(root: str | Path) -> list[Path]:
    """All image files below ``root`` (recursive, case-insensitive extension), sorted by path."""
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames.sort()
        found.extend(
            Path(dirpath, f) for f in sorted(filenames) if f.lower().endswith(IMAGE_EXTENSIONS)
        )
    return sorted(found)


def preprocess(
    image: Image.Image, size: int, mode: str = "center_crop", interpolation: str = "bicubic"
) -> Image.Image:
    """Make an RGB ``size``² image.

    ``center_crop``: resize the shorter side to ``size`` (the LSUN/torchvision Resize + CenterCrop
    recipe), then centre-crop. ``adm``: ADM's centre crop (box-halve while the shorter side is
    >= 2·size, bicubic to ``size``, centre-crop; used for ImageNet by ADM/DiT/SiT/LFM).
    ``resize``: squash to size² (no crop). ``none``: the image must already be size².
    """
    if mode not in RESIZE_MODES:
        raise ValueError(f"resize mode must be one of {RESIZE_MODES}, got {mode!r}")
    image = image.convert("RGB")
    if mode == "none":
        if image.size != (size, size):
            raise ValueError(f"image is {image.size[0]}x{image.size[1]}, expected {size}x{size}")
        return image
    if mode == "resize":
        return image.resize((size, size), _FILTERS[interpolation])
    if mode == "adm":
        while min(image.size) >= 2 * size:
            image = image.resize(tuple(x // 2 for x in image.size), Image.Resampling.BOX)
        interpolation = "bicubic"
    scale = size / min(image.size)
    new = tuple(max(size, round(x * scale)) for x in image.size)
    if new != image.size:
        image = image.resize(new, _FILTERS[interpolation])
    left, top = (new[0] - size) // 2, (new[1] - size) // 2
    return image.crop((left, top, left + size, top + size))


def load_image(
    source: str | Path | Image.Image,
    size: int,
    mode: str = "center_crop",
    interpolation: str = "bicubic",
) -> torch.Tensor:
    """Decode (path or PIL image) and preprocess to a uint8 tensor ``[3, size, size]``."""
    if isinstance(source, Image.Image):
        image = preprocess(source, size, mode, interpolation)
    else:
        # no JPEG `draft` (DCT-domain downscale): it would change pixels vs. the reference recipes
        with Image.open(source) as opened:
            image = preprocess(opened, size, mode, interpolation)
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)


class ImageFolder(Dataset):
    """A list of image files (+ labels); ``files`` and ``labels`` are fixed at construction.

    A corrupt file raises :class:`BadSampleError` naming it; with a ``bad_samples`` log
    (``data.on_bad_sample=skip``) it is recorded there and the next good file of the list
    takes its place, so batches keep their size."""

    def __init__(
        self,
        files: Sequence[Path],
        labels: Sequence[int] | None,
        image_size: int,
        resize: str = "center_crop",
        interpolation: str = "bicubic",
        bad_samples: BadSampleLog | None = None,
    ) -> None:
        self.files = list(files)
        self.bad_samples = bad_samples
        self.labels = np.zeros(len(self.files), np.int64) if labels is None else np.asarray(labels)
        self.image_size = image_size
        self.resize = resize
        self.interpolation = interpolation

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        for offset in range(MAX_REPLACEMENTS):
            i = (index + offset) % len(self.files)
            path = self.files[i]
            try:
                image = load_image(path, self.image_size, self.resize, self.interpolation)
            except BAD_IMAGE_ERRORS as error:
                what = describe_bad_image(Path(path), error)
                if self.bad_samples is None:
                    raise bad_sample(path, what) from error
                if offset == 0:  # a bad replacement is counted when its own index comes up
                    self.bad_samples.add(str(path), what)
                continue
            return image, torch.tensor(int(self.labels[i]), dtype=torch.int64)
        raise BadSampleError(
            f"{MAX_REPLACEMENTS} bad image files in a row from {self.files[index]} "
            "(data.on_bad_sample=skip): check the folder"
        )


def class_labels(files: Sequence[Path], root: Path) -> tuple[list[int], list[str]]:
    """Labels from the first path component below ``root`` (ImageNet-style class folders)."""
    names = [
        f.relative_to(root).parts[0] if len(f.relative_to(root).parts) > 1 else "" for f in files
    ]
    classes = sorted(set(names))
    index = {name: i for i, name in enumerate(classes)}
    return [index[n] for n in names], classes
