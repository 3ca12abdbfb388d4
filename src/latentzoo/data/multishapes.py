"""DataModules for Deep Latent Particles: procedural multi-shapes, CLEVRER and Traffic frames (one
array each); the CelebA/MAFL landmark protocol lives in :mod:`latentzoo.data.celeba_mafl`
(re-exported here).

Loaders yield ``(images [B, C, H, W] in [0, 1], labels)`` like every ImageDataModule.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from latentzoo.data.celeba_mafl import CelebAMAFLDataModule
from latentzoo.data.datasets.errors import DatasetFormatError, DatasetNotFoundError
from latentzoo.data.datasets.proc_multishapes import ProcMultiShapes
from latentzoo.data.images import ImageDataModule

__all__ = [
    "CLEVRERFramesDataModule",
    "CelebAMAFLDataModule",
    "ProcMultiShapesDataModule",
    "TrafficFramesDataModule",
]


class ProcMultiShapesDataModule(ImageDataModule):
    """``proc_multishapes``: train / val / test are disjoint index ranges of one content seed's
    stream (DLP: 40,000 images per seed). ``seed`` seeds the training order (null: run seed)."""

    def __init__(
        self,
        image_size: int = 64,
        num_train: int = 36_000,
        num_val: int = 2000,
        num_test: int = 2000,
        content_seed: int = 0,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("name", "proc_multishapes")
        kwargs.setdefault("image_shape", [3, image_size, image_size])
        kwargs.setdefault("flip", False)
        super().__init__(**kwargs)
        self.sizes = {"train": num_train, "val": num_val, "test": num_test}
        self.content_seed = content_seed

    def build(self) -> dict[str, Dataset]:
        offsets = {"train": 0, "val": self.sizes["train"]}
        offsets["test"] = offsets["val"] + self.sizes["val"]
        return {
            split: ProcMultiShapes(
                self.sizes[split], self.image_size, self.content_seed, offsets[split]
            )
            for split in ("train", "val", "test")
        }

    def reference_info(self, split: str = "train") -> dict[str, Any]:
        return {**super().reference_info(split), "seed": self.content_seed}


class _Frames(Dataset):
    def __init__(self, frames: np.ndarray, start: int, stop: int) -> None:
        self.frames, self.start, self.stop = frames, start, stop

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        frame = torch.from_numpy(np.array(self.frames[self.start + index]))  # a copy: memmap
        return frame.permute(2, 0, 1), torch.tensor(0)


class CLEVRERFramesDataModule(ImageDataModule):
    """CLEVRER frames as DLP reads them: one uint8 array [N, H, W, 3] (frames resized to 128 with
    bicubic, every 3rd frame from frame 26, in video order; ``python -m
    latentzoo.data.dlp_frames clevrer`` writes it), memory-mapped.

    One file (``val_path`` null, datasets.md): the first ``train_fraction`` for training (of
    which the last ``val_fraction`` is held out for validation), the rest for test (DLP
    evaluates on it), so validation never sees test frames. Two files (the original's
    ``clevrer_img128np_fs3_train.npy`` / ``_valid.npy``): train = all of ``path``, val = the
    first ``val_frames`` of ``val_path`` (the original's 5000), test = the rest of ``val_path``.
    ``seed`` seeds the training order (null: the run seed)."""

    dataset_name = "CLEVRER frames"

    def __init__(
        self,
        path: str,
        image_size: int = 128,
        train_fraction: float = 0.9,
        val_fraction: float = 0.05,
        val_path: str | None = None,
        val_frames: int = 5000,
        source: str = "",
        prepare: str = "",
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("name", "clevrer")
        kwargs.setdefault("image_shape", [3, image_size, image_size])
        kwargs.setdefault("flip", False)
        super().__init__(**kwargs)
        self.path, self.train_fraction = Path(path), train_fraction
        self.val_fraction = val_fraction
        self.val_path = Path(val_path) if val_path else None
        self.val_frames = val_frames
        self.source, self.prepare = source, prepare

    def _load(self, path: Path) -> np.ndarray:
        if not path.is_file():
            raise DatasetNotFoundError(
                self.dataset_name,
                path,
                expected=f"one .npy uint8 array [N, {self.image_size}, {self.image_size}, 3]",
                source=self.source,
                prepare=self.prepare,
            )
        frames = np.load(path, mmap_mode="r")
        size = (self.image_size, self.image_size, 3)
        if frames.ndim != 4 or tuple(frames.shape[1:]) != size or frames.dtype != np.uint8:
            raise DatasetFormatError(
                f"{path}: expected [N, {self.image_size}, {self.image_size}, 3] uint8, "
                f"got {frames.shape} {frames.dtype}"
            )
        return frames

    def build(self) -> dict[str, Dataset]:
        frames = self._load(self.path)
        if self.val_path is not None:
            held = self._load(self.val_path)
            if len(held) <= self.val_frames:
                raise DatasetFormatError(
                    f"{self.val_path}: {len(held)} frames leave none for test after the first "
                    f"val_frames={self.val_frames} for validation; lower data.val_frames"
                )
            return {
                "train": _Frames(frames, 0, len(frames)),
                "val": _Frames(held, 0, self.val_frames),
                "test": _Frames(held, self.val_frames, len(held)),
            }
        cut = int(len(frames) * self.train_fraction)
        val_start = cut - max(1, int(cut * self.val_fraction))
        return {
            "train": _Frames(frames, 0, val_start),
            "val": _Frames(frames, val_start, cut),
            "test": _Frames(frames, cut, len(frames)),
        }


class TrafficFramesDataModule(CLEVRERFramesDataModule):
    """DLP's Traffic set (private; not distributed): the same one-array format, the original's
    ``img128np_fs3.npy`` (frames cropped to (60, 0, 480, 420), resized to 128 bicubic, every
    3rd; ``python -m latentzoo.data.dlp_frames traffic`` writes it). The original trains on the
    first 90 % and validates on the last 10 %: here that 10 % is the test split and the last
    ``val_fraction`` of the training part is held out for validation."""

    dataset_name = "Traffic frames"

    def __init__(self, path: str, **kwargs: Any) -> None:
        kwargs.setdefault("name", "traffic")
        super().__init__(path, **kwargs)
