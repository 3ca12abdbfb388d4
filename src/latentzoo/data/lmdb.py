"""LMDB image sets: NVAE-style (CelebA-HQ 256, FFHQ; LFM's data) and LSUN exports.

Two layouts are read, detected per database:

* **NVAE** (``convert_tfrecord_to_lmdb.py`` / ``create_*_lmdb.py``; LFM's ``LMDBDataset``): keys
  ``str(i).encode()`` for i = 0..N-1, values either an encoded image (PNG/JPEG/WEBP...) or raw
  uint8 RGB bytes of a square S×S×3 image (S = sqrt(len / 3)). Splits are sibling databases
  ``<root>/train.lmdb`` and ``<root>/validation.lmdb``.
* **LSUN / torchvision** (``<root>/church_outdoor_train_lmdb``): arbitrary keys, encoded (WEBP or
  JPEG) values; item i is the i-th key in LMDB (byte) order, as torchvision's ``LSUNClass`` reads
  it, so ``subset: 120000`` keeps LFM's first 120k images. Only the first ``subset`` keys are
  listed (a key scan reads no values).

Items are ``(uint8 [3, S, S], label 0)`` like :mod:`latentzoo.data.datasets.image_folder`, after
the same resize / centre crop (``preprocess``).
"""

from __future__ import annotations

import contextlib
import io
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Subset

from latentzoo.data.datasets.errors import BadSampleError, DatasetFormatError, DatasetNotFoundError
from latentzoo.data.datasets.image_folder import BAD_IMAGE_ERRORS, describe_bad_image, load_image
from latentzoo.data.images import ImageDataModule
from latentzoo.utils.logging import RankedLogger

log = RankedLogger(__name__, rank_zero_only=True)

__all__ = ["LMDBDataModule", "LMDBImages", "is_encoded_image"]

_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"BM")


def is_encoded_image(value: bytes | memoryview) -> bool:
    """True for PNG/JPEG/GIF/BMP/WEBP file bytes, False for raw pixel bytes."""
    head = bytes(value[:12])
    return head.startswith(_MAGIC) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")


def decode_value(value: bytes | memoryview) -> Image.Image:
    """An LMDB value as an RGB image: decoded file bytes, or a raw square uint8 S×S×3 array."""
    if is_encoded_image(value):
        with Image.open(io.BytesIO(bytes(value))) as image:
            return image.convert("RGB")
    pixels = np.frombuffer(value, dtype=np.uint8)
    size = math.isqrt(len(pixels) // 3)
    if size * size * 3 != len(pixels):
        raise DatasetFormatError(
            f"an LMDB value of {len(pixels)} bytes is neither an encoded image nor raw square "
            "RGB (S*S*3 bytes); rebuild the LMDB with NVAE's scripts or an LSUN export"
        )
    return Image.fromarray(pixels.reshape(size, size, 3).copy(), mode="RGB")


# resolved path -> (pid, environment): LMDB allows one handle per file and process, so all
# datasets of a process share it; a handle inherited through fork is closed and opened anew
_ENVS: dict[str, tuple[int, Any]] = {}


def _env(path: Path) -> Any:
    import lmdb

    key = str(path.resolve())
    pid, env = _ENVS.get(key, (-1, None))
    if env is not None and pid != os.getpid():
        with contextlib.suppress(Exception):
            env.close()  # this process's copy only (fds and maps of the parent stay)
        env = None
    if env is None:
        env = lmdb.open(
            str(path),
            subdir=path.is_dir(),
            readonly=True,
            lock=False,
            readahead=False,
            meminit=False,
            max_readers=64,
        )
        _ENVS[key] = (os.getpid(), env)
    return env


class LMDBImages(Dataset):
    """One LMDB database of images (layout detected; module docstring)."""

    def __init__(
        self,
        path: str | Path,
        image_size: int,
        resize: str = "center_crop",
        interpolation: str = "bicubic",
        limit: int | None = None,
    ) -> None:
        self.path = Path(path)
        self.image_size, self.resize, self.interpolation = image_size, resize, interpolation
        with _env(self.path).begin(buffers=False) as txn:
            entries = int(txn.stat()["entries"])
            indexed = entries > 0 and txn.get(b"0") is not None
            indexed = indexed and txn.get(str(entries - 1).encode()) is not None
            count = entries if limit is None else min(limit, entries)
            self.keys: list[bytes] | None = None
            if not indexed:  # LSUN: the first `count` keys in LMDB order
                keys = txn.cursor().iternext(keys=True, values=False)
                self.keys = [bytes(k) for k, _ in zip(keys, range(count), strict=False)]
        self.layout = "index" if self.keys is None else "keys"
        self.length = count

    def _txn_get(self, key: bytes) -> bytes:
        with _env(self.path).begin(buffers=False) as txn:
            value = txn.get(key)
        if value is None:
            raise DatasetFormatError(f"{self.path}: key {key!r} is missing; the LMDB is incomplete")
        return value

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= index < self.length:
            raise IndexError(index)
        key = str(index).encode() if self.keys is None else self.keys[index]
        try:
            image = decode_value(self._txn_get(key))
            pixels = load_image(image, self.image_size, self.resize, self.interpolation)
        except BAD_IMAGE_ERRORS as error:
            what = describe_bad_image(None, error)
            raise BadSampleError(
                f"corrupt sample {self.path} (key {key!r}): {what}; rebuild the LMDB"
            ) from error
        return pixels, torch.tensor(0, dtype=torch.int64)


class LMDBDataModule(ImageDataModule):
    """Image LMDBs per split: ``train`` (required), ``val`` and ``test`` (paths below ``root``).

    ``val: null`` uses the first ``fallback_val_size`` training images; ``test: null`` = val.
    ``subset`` keeps the first N training images (LFM's LSUN: 120,000).
    """

    def __init__(
        self,
        root: str,
        image_size: int = 256,
        train: str = "train.lmdb",
        val: str | None = "validation.lmdb",
        test: str | None = None,
        subset: int | None = None,
        resize: str = "center_crop",
        interpolation: str = "bicubic",
        fallback_val_size: int = 256,
        source: str = "an LMDB that you provide (set data.root)",
        prepare: str | None = None,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("name", "lmdb_images")
        kwargs.setdefault("image_shape", [3, image_size, image_size])
        super().__init__(**kwargs)
        self.root = Path(root)
        self.paths = {"train": train, "val": val, "test": test}
        self.subset = subset
        self.resize, self.interpolation = resize, interpolation
        self.fallback_val_size = fallback_val_size
        self.source, self.prepare = source, prepare

    def _lmdb(self, split: str, limit: int | None = None) -> LMDBImages:
        path = self.root / str(self.paths[split])
        if not (path / "data.mdb").is_file() and not path.is_file():
            raise DatasetNotFoundError(
                self.name,
                path,
                expected=f"an LMDB database (a folder with data.mdb) for the {split} split: NVAE "
                "layout (keys '0'..'N-1', raw RGB or encoded images) or an LSUN export",
                source=self.source,
                prepare=self.prepare,
            )
        return LMDBImages(path, self.image_size, self.resize, self.interpolation, limit)

    def build(self) -> dict[str, Dataset]:
        datasets: dict[str, Dataset] = {"train": self._lmdb("train", self.subset)}
        if self.paths["val"]:
            datasets["val"] = self._lmdb("val")
        else:
            n = min(self.fallback_val_size, len(datasets["train"]))  # type: ignore[arg-type]
            datasets["val"] = Subset(datasets["train"], range(n))
            log.info(f"{self.name}: no val LMDB; using the first {n} training images")
        datasets["test"] = self._lmdb("test") if self.paths["test"] else datasets["val"]
        log.info(f"{self.name}: " + ", ".join(f"{s} {len(d)}" for s, d in datasets.items()))  # type: ignore[arg-type]
        return datasets

    def reference_info(self, split: str = "train") -> dict[str, Any]:
        return {
            **super().reference_info(split),
            "root": str(self.root.resolve()),
            "lmdb": self.paths.get(split),
            "subset": self.subset if split == "train" else None,
            "resize": self.resize,
            "interpolation": self.interpolation,
        }
