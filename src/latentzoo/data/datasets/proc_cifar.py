"""``proc_cifar``: a CIFAR-10 stand-in rendered in-process (``shared/specs/datasets.md`` §11).

Ten classes = 5 shapes (disc, square, triangle, ring, cross) x 2 palettes (warm hues: red to
yellow; cool hues: green to blue); label ``c`` draws shape ``c // 2`` in palette ``c % 2``. Each
3x32x32 image is a two-colour gradient background (any hue, low saturation, so it does not give
the class away) with one shape at a random position, scale and rotation, 2x2 supersampled, plus
uniform pixel noise of a random amplitude (one of 512 fixed noise fields, randomly rolled and
sign-flipped per image), stored as uint8 like CIFAR.

Determinism: every random number of image ``i`` is a counter-based hash (splitmix64, shared with
``proc_digits``) of ``(seed, split, i, stream)``, so any batch, order or worker gives the same
bytes and a batch renders in one vectorised torch call. Labels are ``i % 10`` (class-balanced).
Train and test use different hash keys, so the test images do not change with ``num_train``.
Not pixel-identical to CIFAR: results on it are labelled ``proc_cifar``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch.nn.functional import avg_pool2d
from torch.utils.data import Dataset

from latentzoo.data.datasets.factors import IndexLike, _as_int64_array
from latentzoo.data.datasets.proc_digits import _hash_uniform

__all__ = ["ProcCIFAR", "SHAPES", "render_proc_cifar"]

SHAPES = ("disc", "square", "triangle", "ring", "cross")
NUM_CLASSES = 10
CHUNK = 1024
NOISE_BANK = 512  # distinct noise fields; each image rolls one by a random offset
# hue ranges of the two palettes (fractions of the colour wheel)
PALETTES = ((-0.05, 0.15), (0.35, 0.68))  # warm (red..yellow), cool (green..blue)
_PARAMS = ("cx", "cy", "scale", "angle", "hue", "sat", "val", "bg_hue", "bg_hue2", "bg_sat")
_PARAMS += ("bg_v0", "bg_v1", "direction", "noise")


def _hsv_to_rgb(h: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Vectorised HSV -> RGB for tensors (n,); returns (n, 3)."""
    k = torch.tensor([5.0, 3.0, 1.0])
    kk = (k + h[:, None] * 6.0) % 6.0
    return v[:, None] - (v * s)[:, None] * torch.minimum(kk, 4.0 - kk).clamp(0.0, 1.0)


def _inside(shape: int, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Whether the points (u, v) (shape-normalised coordinates) lie in shape ``SHAPES[shape]``."""
    if shape == 0:  # disc
        return u * u + v * v <= 1.0
    if shape == 1:  # square
        return torch.maximum(u.abs(), v.abs()) <= 0.8
    if shape == 2:  # triangle: half-planes n . p <= 0.5, normals at 90, 210 and 330 degrees
        c = math.sqrt(3) / 2
        return (-v <= 0.5) & (c * u + 0.5 * v <= 0.5) & (-c * u + 0.5 * v <= 0.5)
    if shape == 3:  # ring
        r2 = u * u + v * v
        return (r2 <= 1.0) & (r2 >= 0.33)
    au, av = u.abs(), v.abs()  # cross
    return ((au <= 0.32) & (av <= 0.95)) | ((av <= 0.32) & (au <= 0.95))


def render_proc_cifar(
    labels: torch.Tensor,
    params: dict[str, torch.Tensor],
    noise_field: torch.Tensor,
    image_size: int = 32,
) -> torch.Tensor:
    """Render uint8 images (n, 3, S, S) from labels (n,), per-image parameters (n,) each and a
    noise field in [-1, 1] (n, 3, S, S) scaled per image by ``params["noise"]``.

    Only elementwise ops and per-image pooling, so an image's bytes do not depend on its batch.
    """
    n, side = labels.shape[0], 2 * image_size  # 2x2 supersampling
    p = {k: t.to(torch.float32)[:, None, None] for k, t in params.items()}
    centres = (torch.arange(side, dtype=torch.float32) + 0.5) / side
    y, x = centres[None, :, None], centres[None, None, :]
    dx, dy = x - p["cx"], y - p["cy"]
    cos, sin = torch.cos(p["angle"]), torch.sin(p["angle"])
    u = (cos * dx + sin * dy) / p["scale"]
    v = (-sin * dx + cos * dy) / p["scale"]
    shapes = torch.div(labels, 2, rounding_mode="floor")
    alpha = torch.empty((n, side, side))
    for k in range(len(SHAPES)):  # each image evaluates only its own shape
        sel = shapes == k
        alpha[sel] = _inside(k, u[sel], v[sel]).to(torch.float32)
    alpha = avg_pool2d(alpha[:, None], 2)  # (n, 1, S, S) antialiased coverage
    flat = {k: t.reshape(n) for k, t in p.items()}
    fg = _hsv_to_rgb(flat["hue"] % 1.0, flat["sat"], flat["val"])[:, :, None, None]
    bg0 = _hsv_to_rgb(flat["bg_hue"], flat["bg_sat"], flat["bg_v0"])[:, :, None, None]
    bg1 = _hsv_to_rgb(flat["bg_hue2"], flat["bg_sat"], flat["bg_v1"])[:, :, None, None]
    c = (torch.arange(image_size, dtype=torch.float32) + 0.5) / image_size
    yy, xx = c[None, :, None], c[None, None, :]
    ramp = (xx - 0.5) * torch.cos(p["direction"]) + (yy - 0.5) * torch.sin(p["direction"])
    ramp = (ramp / 1.4142 + 0.5).clamp(0, 1)[:, None]  # (n, 1, S, S)
    image = torch.lerp(bg0, bg1, ramp)
    image = torch.lerp(image, fg, alpha)
    image = image + noise_field.to(torch.float32) * p["noise"][:, None]
    return image.clamp_(0.0, 1.0).mul_(255.0).round_().to(torch.uint8)


class ProcCIFAR(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Procedural CIFAR-10 stand-in: items ``(image float32 (3, S, S) in [0, 1], label int64)``.

    Args:
        split: ``"train"`` or ``"test"`` (different hash keys).
        length: number of images (50,000 train / 10,000 test in the config).
        image_size: side S (rendered natively at any size; 32 mimics CIFAR).
        seed: dataset seed.
        cache: keep rendered images (uint8, 3 KB each at 32x32) and gather them next time.
    """

    num_classes = NUM_CLASSES

    def __init__(
        self,
        split: Literal["train", "test"] = "train",
        length: int = 50_000,
        image_size: int = 32,
        seed: int = 0,
        cache: bool = False,
    ) -> None:
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        if length < 1 or image_size < 8:
            raise ValueError("proc_cifar needs length >= 1 and image_size >= 8")
        self.split, self.length, self.image_size = split, int(length), int(image_size)
        self.seed = int(seed)
        self._key = 2 * self.seed + (split == "test")  # distinct per (seed, split)
        self.cache = bool(cache)
        self._cached: torch.Tensor | None = None
        self._done: np.ndarray | None = None
        self._bank: torch.Tensor | None = None  # (NOISE_BANK, 3, S * S) noise fields

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (3, self.image_size, self.image_size)

    def __len__(self) -> int:
        return self.length

    @property
    def labels(self) -> torch.Tensor:
        """Labels of the whole split, int64 (N,)."""
        return torch.arange(self.length, dtype=torch.int64) % NUM_CLASSES

    def _checked(self, indices: IndexLike) -> np.ndarray:
        idx = _as_int64_array(indices, "indices").reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= self.length):
            raise IndexError(f"index out of range for proc_cifar {self.split} of {self.length}")
        return idx

    def params_of(self, indices: IndexLike) -> dict[str, np.ndarray]:
        """The random parameters of images ``indices`` (float64 arrays (n,))."""
        idx = self._checked(indices)
        u = {name: _hash_uniform(self._key, idx, s) for s, name in enumerate(_PARAMS)}
        palette = np.asarray(PALETTES)[idx % 2]
        return {
            "cx": 0.3 + 0.4 * u["cx"],
            "cy": 0.3 + 0.4 * u["cy"],
            "scale": 0.16 + 0.14 * u["scale"],  # circumradius / image side
            "angle": 2 * np.pi * u["angle"],
            "hue": (palette[:, 0] + (palette[:, 1] - palette[:, 0]) * u["hue"]) % 1.0,
            "sat": 0.55 + 0.45 * u["sat"],
            "val": 0.6 + 0.4 * u["val"],
            "bg_hue": u["bg_hue"],
            "bg_hue2": (u["bg_hue"] + 0.3 * u["bg_hue2"] - 0.15) % 1.0,
            "bg_sat": 0.35 * u["bg_sat"],
            "bg_v0": 0.1 + 0.8 * u["bg_v0"],
            "bg_v1": 0.1 + 0.8 * u["bg_v1"],
            "direction": 2 * np.pi * u["direction"],
            "noise": 0.01 + 0.07 * u["noise"],  # amplitude of the uniform pixel noise
        }

    def _render(self, idx: np.ndarray) -> torch.Tensor:
        params = {k: torch.from_numpy(v) for k, v in self.params_of(idx).items()}
        labels = torch.from_numpy(idx % NUM_CLASSES)
        return render_proc_cifar(labels, params, self._noise_of(idx), self.image_size)

    def _noise_of(self, idx: np.ndarray) -> torch.Tensor:
        """Per-image noise in [-1, 1]: one of ``NOISE_BANK`` hashed fields, rolled by a hashed
        offset and sign-flipped by a hashed bit (cheap, and still a pure function of the index)."""
        side = self.image_size
        if self._bank is None:
            cells = np.arange(NOISE_BANK * 3 * side * side)
            bank = 2.0 * _hash_uniform(self._key, cells, len(_PARAMS)) - 1.0
            self._bank = torch.from_numpy(bank.astype(np.float32)).reshape(NOISE_BANK, 3, -1)
        h = [_hash_uniform(self._key, idx, len(_PARAMS) + 1 + i) for i in range(4)]
        k, dy, dx = (
            torch.from_numpy((u * m).astype(np.int64))
            for u, m in zip(h, (NOISE_BANK, side, side), strict=False)
        )
        sign = torch.from_numpy(np.where(h[3] < 0.5, -1.0, 1.0).astype(np.float32))
        grid = torch.arange(side)
        rows = (grid[None, :] + dy[:, None]) % side  # (n, S)
        cols = (grid[None, :] + dx[:, None]) % side
        flat = (rows[:, :, None] * side + cols[:, None, :]).reshape(len(idx), 1, -1)
        noise = self._bank[k].gather(2, flat.expand(-1, 3, -1))
        return (noise * sign[:, None, None]).reshape(len(idx), *self.image_shape)

    def images_u8_of(self, indices: IndexLike) -> torch.Tensor:
        """Render images as uint8 (n, 3, S, S) (from the cache when on)."""
        idx = self._checked(indices)
        if self.cache:
            if self._cached is None or self._done is None:
                self._cached = torch.empty((self.length, *self.image_shape), dtype=torch.uint8)
                self._done = np.zeros(self.length, dtype=bool)
            todo = np.unique(idx[~self._done[idx]])
            for start in range(0, todo.size, CHUNK):
                sel = todo[start : start + CHUNK]
                self._cached[torch.from_numpy(sel)] = self._render(sel)
            self._done[todo] = True
            return self._cached[torch.from_numpy(idx)]
        parts = [self._render(idx[s : s + CHUNK]) for s in range(0, idx.size, CHUNK)]
        return torch.cat(parts) if parts else torch.empty((0, *self.image_shape), torch.uint8)

    def get_batch(self, indices: IndexLike) -> tuple[torch.Tensor, torch.Tensor]:
        """Images float32 (n, 3, S, S) in [0, 1] and labels int64 (n,)."""
        idx = self._checked(indices)
        images = self.images_u8_of(idx).to(torch.float32).div_(255.0)
        return images, torch.from_numpy(idx % NUM_CLASSES)

    def __getitem__(self, index: Any) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = self.get_batch([int(index)])
        return images[0], labels[0]

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        images, labels = self.get_batch(np.asarray(indices, dtype=np.int64))
        return list(zip(images.unbind(0), labels.unbind(0), strict=True))

    def __repr__(self) -> str:
        return f"ProcCIFAR(split={self.split!r}, seed={self.seed}, len={self.length})"
