"""Procedural digits (``proc_digits``): an MNIST stand-in rendered in-process, no download.

Ten classes, images 1x28x28 (``shared/specs/datasets.md`` §11). Each digit is a stroke-font glyph
(a few polylines in a unit box) drawn with a per-image random height, width, slant, stroke
thickness and offset; a pixel's intensity is antialiased from its distance to the nearest stroke
segment, ``clamp(thickness / 2 + 0.5 - distance, 0, 1)``, then stored as uint8 like MNIST.

Determinism: image ``i`` of a split is a pure function of ``(seed, split, i)``: its parameters come
from a counter-based hash (splitmix64) of that triple, never from a stateful generator, so any
batch, order or worker gives the same bytes. The split is fixed: 60,000 train and 10,000 test
images per seed (global indices 0..59,999 and 60,000..69,999), with label ``global index % 10``,
so both splits are exactly class-balanced. Not pixel-identical to MNIST: results on it are
labelled ``proc_digits``.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from latentzoo.data.datasets.factors import IndexLike, _as_int64_array

__all__ = ["ProcDigits", "ProcDigitsDataModule", "glyph_segments"]

SPLITS: dict[str, tuple[int, int]] = {"train": (0, 60_000), "test": (60_000, 10_000)}
SIDE = 28
NUM_CLASSES = 10
CHUNK = 512  # images per rendering chunk (keeps the (n, segments, pixels) temporaries small)

# Ranges of the per-image style parameters (pixels unless noted).
HEIGHT = (16.0, 21.0)  # glyph height
WIDTH = (0.8, 1.1)  # width / nominal width (unitless)
SLANT = (-0.15, 0.35)  # horizontal shear per unit height (unitless; > 0 leans right)
THICKNESS = (1.6, 3.2)  # stroke width
OFFSET = 1.5  # |dx|, |dy| of the glyph centre from the image centre


def _arc(cx: float, cy: float, rx: float, ry: float, a0: float, a1: float, n: int) -> list:
    """Polyline of an elliptic arc from angle a0 to a1 (degrees, y down, 0 = right)."""
    return [
        (cx + rx * math.cos(math.radians(a)), cy + ry * math.sin(math.radians(a)))
        for a in np.linspace(a0, a1, n + 1)
    ]


def _font() -> tuple[list[list[tuple[float, float]]], ...]:
    """Polylines of the ten digits in a unit box (x right, y down; x in [0.15, 0.85])."""
    six = [
        [(0.72, 0.06), (0.5, 0.0), (0.3, 0.12), (0.2, 0.4), (0.2, 0.72)],
        _arc(0.5, 0.74, 0.3, 0.26, 180, 540, 12),
    ]
    nine = [[(1.0 - x, 1.0 - y) for x, y in line] for line in six]
    return (
        [_arc(0.5, 0.5, 0.3, 0.5, 0, 360, 16)],
        [[(0.33, 0.18), (0.52, 0.0), (0.52, 1.0)]],
        [[*_arc(0.5, 0.27, 0.3, 0.27, 200, 360, 6), (0.74, 0.45), (0.18, 1.0), (0.85, 1.0)]],
        [_arc(0.48, 0.26, 0.3, 0.26, 210, 450, 7), _arc(0.48, 0.74, 0.33, 0.26, 270, 510, 7)],
        [[(0.66, 1.0), (0.66, 0.0), (0.15, 0.68), (0.86, 0.68)]],
        [[(0.8, 0.0), (0.28, 0.0), (0.22, 0.44), *_arc(0.47, 0.7, 0.33, 0.3, 240, 500, 8)]],
        six,
        [[(0.15, 0.0), (0.85, 0.0), (0.38, 1.0)]],
        [_arc(0.5, 0.25, 0.26, 0.25, 0, 360, 12), _arc(0.5, 0.73, 0.31, 0.27, 0, 360, 12)],
        nine,
    )


def glyph_segments() -> tuple[torch.Tensor, torch.Tensor]:
    """Segment table of the font: ``(segments (10, M, 2, 2) float64, valid (10, M) bool)``.

    ``segments[c, m]`` holds the start and end (x, y) of segment ``m`` of digit ``c`` in the unit
    box; digits with fewer than M segments are padded with invalid rows.
    """
    per_digit = []
    for lines in _font():
        segs = [(line[i], line[i + 1]) for line in lines for i in range(len(line) - 1)]
        per_digit.append(np.asarray(segs, dtype=np.float64))
    m = max(len(s) for s in per_digit)
    table = np.zeros((NUM_CLASSES, m, 2, 2))
    valid = np.zeros((NUM_CLASSES, m), dtype=bool)
    for c, segs in enumerate(per_digit):
        table[c, : len(segs)] = segs
        valid[c, : len(segs)] = True
    return torch.from_numpy(table), torch.from_numpy(valid)


def _hash_uniform(seed: int, index: np.ndarray, stream: int) -> np.ndarray:
    """Uniform [0, 1) float64 per (seed, index, stream) by splitmix64 (counter-based, stateless)."""
    with np.errstate(over="ignore"):
        z = index.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        z = z + np.uint64((seed * 0x632BE59BD9B4E019 + stream * 0xD1B54A32D192ED03) % 2**64)
        z = z + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) * 2.0**-53


_CACHE_LOCK = threading.Lock()  # guards the render caches of all ProcDigits (see _from_cache)


class ProcDigits(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Procedural MNIST stand-in: items ``(image float32 (1, 28, 28) in [0, 1], label int64)``.

    Args:
        split: ``"train"`` (60,000 images) or ``"test"`` (10,000).
        seed: the dataset seed; each seed is a different (fixed) set of 70,000 digits.
        cache: keep every rendered image (uint8, 784 bytes each; 47 MB for the train split) and
            gather it next time instead of re-rendering. Per process: DataLoader workers each
            fill their own cache.

    ``get_batch`` / ``__getitems__`` render a whole batch in one vectorised call.
    """

    image_shape = (1, SIDE, SIDE)
    num_classes = NUM_CLASSES
    # images are a function of (seed, position): a loader may render ahead in a thread
    draws_random = False

    def __init__(
        self, split: Literal["train", "test"] = "train", seed: int = 0, cache: bool = False
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
        self.split = split
        self.seed = int(seed)
        self._offset, self._size = SPLITS[split]
        segments, self._valid = glyph_segments()
        self._segments = segments.to(torch.float32)
        centres = torch.arange(SIDE, dtype=torch.float32) + 0.5
        self._px = centres.repeat(SIDE)  # pixel-centre x, row-major (y, x)
        self._py = centres.repeat_interleave(SIDE)
        self.cache = bool(cache)
        self._cached: torch.Tensor | None = None  # uint8 (N, 784), allocated on first use
        self._done: np.ndarray | None = None  # bool (N,): which rows of _cached are rendered

    def __len__(self) -> int:
        return self._size

    @property
    def labels(self) -> np.ndarray:
        """Labels of the whole split, int64 (N,)."""
        return (np.arange(self._size, dtype=np.int64) + self._offset) % NUM_CLASSES

    def labels_of(self, positions: IndexLike) -> np.ndarray:
        """Labels of positions (int64, same shape)."""
        return (self._checked(positions) + self._offset) % NUM_CLASSES

    def _checked(self, positions: IndexLike) -> np.ndarray:
        pos = _as_int64_array(positions, "positions")
        if pos.size and (pos.min() < 0 or pos.max() >= self._size):
            raise IndexError(f"position out of range for {self.split} split of {self._size}")
        return pos

    def style_of(self, positions: IndexLike) -> dict[str, np.ndarray]:
        """The random style parameters of positions: height, width, slant, thickness, dx, dy."""
        g = self._checked(positions).reshape(-1) + self._offset

        def draw(stream: int, lo: float, hi: float) -> np.ndarray:
            return lo + (hi - lo) * _hash_uniform(self.seed, g, stream)

        return {
            "height": draw(0, *HEIGHT),
            "width": draw(1, *WIDTH),
            "slant": draw(2, *SLANT),
            "thickness": draw(3, *THICKNESS),
            "dx": draw(4, -OFFSET, OFFSET),
            "dy": draw(5, -OFFSET, OFFSET),
        }

    def images_u8_of(self, positions: IndexLike) -> torch.Tensor:
        """Render positions (N,) as uint8 (N, 1, 28, 28)."""
        pos = self._checked(positions).reshape(-1)
        if self.cache:
            return self._from_cache(pos).reshape(-1, 1, SIDE, SIDE)
        out = torch.empty((pos.size, SIDE * SIDE), dtype=torch.uint8)
        for start in range(0, pos.size, CHUNK):
            sel = pos[start : start + CHUNK]
            out[start : start + len(sel)] = self._render(sel)
        return out.reshape(-1, 1, SIDE, SIDE)

    def _from_cache(self, pos: np.ndarray) -> torch.Tensor:
        # a prefetch thread (train) and the main thread (val, same split) may fill it at once
        with _CACHE_LOCK:
            return self._from_cache_locked(pos)

    def _from_cache_locked(self, pos: np.ndarray) -> torch.Tensor:
        if self._cached is None or self._done is None:
            self._cached = torch.empty((self._size, SIDE * SIDE), dtype=torch.uint8)
            self._done = np.zeros(self._size, dtype=bool)
        todo = np.unique(pos[~self._done[pos]])
        for start in range(0, todo.size, CHUNK):
            sel = todo[start : start + CHUNK]
            self._cached[torch.from_numpy(sel)] = self._render(sel)
        self._done[todo] = True
        return self._cached[torch.from_numpy(pos)]

    def _render(self, pos: np.ndarray) -> torch.Tensor:
        """uint8 (n, 784) images of positions ``pos``.

        Only elementwise float32 ops and a per-image min, so an image's bytes do not depend on the
        batch it is rendered in.
        """
        style = {
            k: torch.from_numpy(v.astype(np.float32))[:, None, None]
            for k, v in self.style_of(pos).items()
        }
        labels = torch.from_numpy(self.labels_of(pos))
        seg = self._segments[labels]  # (n, M, 2, 2) unit-box endpoints
        u, v = seg[..., 0], seg[..., 1]  # (n, M, 2)
        h = style["height"]
        # glyph -> pixels: scale by the height (x also by the width factor), shear by the slant
        # about the glyph's vertical centre, then centre in the image plus the offset.
        x = SIDE / 2 + style["dx"] + (u - 0.5) * h * style["width"] + style["slant"] * (0.5 - v) * h
        y = SIDE / 2 + style["dy"] + (v - 0.5) * h
        ax, ay = x[..., 0:1], y[..., 0:1]  # (n, M, 1)
        bx, by = x[..., 1:2] - ax, y[..., 1:2] - ay
        px, py = self._px - ax, self._py - ay  # (n, M, 784): pixel minus segment start
        length2 = (bx * bx + by * by).clamp_min(1e-12)
        t = ((px * bx + py * by) / length2).clamp_(0.0, 1.0)
        dist2 = (px - t * bx).square_() + (py - t * by).square_()
        dist2 = dist2.masked_fill_(~self._valid[labels][..., None], math.inf)
        dist = dist2.amin(dim=1).sqrt_()  # (n, 784)
        ink = (style["thickness"][:, :, 0] * 0.5 + 0.5 - dist).clamp_(0.0, 1.0)
        return ink.mul_(255.0).round_().to(torch.uint8)

    def get_batch(self, positions: IndexLike) -> tuple[torch.Tensor, torch.Tensor]:
        """Batched items: images float32 (N, 1, 28, 28) in [0, 1] and labels int64 (N,)."""
        pos = self._checked(positions).reshape(-1)
        images = self.images_u8_of(pos).to(torch.float32).div_(255.0)
        return images, torch.from_numpy(self.labels_of(pos))

    def __getitem__(self, i: Any) -> tuple[torch.Tensor, torch.Tensor]:
        pos = _as_int64_array(i, "position")
        if pos.ndim == 0:
            images, labels = self.get_batch(pos.reshape(1))
            return images[0], labels[0]
        return self.get_batch(pos)

    def __getitems__(self, positions: Sequence[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Batched fetch for ``DataLoader`` auto-collation: renders once, returns the item list."""
        images, labels = self.get_batch(np.asarray(positions, dtype=np.int64))
        return list(zip(images.unbind(0), labels.unbind(0), strict=True))

    def __repr__(self) -> str:
        return f"ProcDigits(split={self.split!r}, seed={self.seed}, len={len(self)})"


class ProcDigitsDataModule(L.LightningDataModule):
    """proc_digits as a labelled image set: batches ``(images (B, 1, 28, 28), labels (B,))``.

    Train is the 60k train split minus a seeded ``val_size`` held out for validation; test is the
    10k test split. ``num_classes`` = 10. ``cache`` keeps rendered digits (see ProcDigits).
    ``content_seed`` (which digits) and ``split_seed`` define the dataset; ``seed`` seeds the
    training order (null: the run seed).
    """

    num_classes = NUM_CLASSES

    def __init__(
        self,
        image_shape: Sequence[int] = (1, SIDE, SIDE),
        content_seed: int = 0,
        val_size: int = 5000,
        split_seed: int = 0,
        seed: int | None = None,
        batch_size: int = 128,
        num_workers: int = 0,
        pin_memory: bool = False,
        cache: bool = True,
        num_classes: int = NUM_CLASSES,
        prefetch: int = 2,
    ) -> None:
        super().__init__()
        if tuple(image_shape) != ProcDigits.image_shape:
            raise ValueError(f"proc_digits images are {list(ProcDigits.image_shape)}")
        if num_classes != NUM_CLASSES:  # a key so that configs can read ${data.num_classes}
            raise ValueError(f"proc_digits has {NUM_CLASSES} classes, not {num_classes}")
        self.image_shape = tuple(image_shape)
        self.train_set = ProcDigits("train", content_seed, cache=cache)
        self.test_set = ProcDigits("test", content_seed, cache=cache)
        self.seed = seed
        order = np.random.default_rng(split_seed).permutation(len(self.train_set))
        self.splits = {"val": np.sort(order[:val_size]), "train": order[val_size:]}
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.prefetch = int(prefetch)  # training batches rendered ahead in a thread

    def _loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            drop_last=shuffle,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        from latentzoo.data.resumable import resumable_loader

        return resumable_loader(
            Subset(self.train_set, self.splits["train"].tolist()),
            self.batch_size,
            seed=self.seed,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
            prefetch=self.prefetch,
        )

    def val_dataloader(self) -> DataLoader:
        return self._loader(Subset(self.train_set, self.splits["val"].tolist()), False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, False)
