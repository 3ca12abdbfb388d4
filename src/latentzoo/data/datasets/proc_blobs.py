"""``proc_blobs``: a procedural natural-image stand-in of a few coloured Gaussian blobs.

Each image is a two-colour gradient background with 2 to ``max_blobs`` anisotropic, rotated
Gaussian blobs alpha-composited on top. Everything is drawn from a generator seeded by
``(seed, index)``, so an index always gives the same bytes, and a batch is rendered in one
vectorised torch call. With ``num_classes > 0`` the class picks the hue band of the blobs
(class ``c`` draws hues in ``[c / C, (c + 1) / C)``), a cheap visible label for conditional runs.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = ["ProcBlobs", "render_blobs"]


def _hsv_to_rgb(h: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Vectorised HSV -> RGB for tensors of the same shape; returns shape + (3,)."""
    k = torch.tensor([5.0, 3.0, 1.0], dtype=h.dtype)
    kk = (k + h.unsqueeze(-1) * 6.0) % 6.0
    return v.unsqueeze(-1) - (v * s).unsqueeze(-1) * (torch.minimum(kk, 4.0 - kk).clamp(0.0, 1.0))


def _draw_params(seed: int, index: int, max_blobs: int, num_classes: int) -> np.ndarray:
    """All random numbers of one image, from a generator keyed by (seed, index)."""
    rng = np.random.default_rng([seed, index])
    label = rng.integers(num_classes) if num_classes > 0 else 0
    count = rng.integers(2, max_blobs + 1)
    background = rng.uniform(0.0, 1.0, size=(2, 3)) * 0.6  # two dark-ish colours
    direction = rng.uniform(0.0, 2 * np.pi)
    blobs = np.empty((max_blobs, 8))
    blobs[:, 0:2] = rng.uniform(0.15, 0.85, size=(max_blobs, 2))  # centre x, y
    blobs[:, 2:4] = rng.uniform(0.05, 0.22, size=(max_blobs, 2))  # std along the two axes
    blobs[:, 4] = rng.uniform(0.0, np.pi, size=max_blobs)  # rotation
    blobs[:, 5] = (label + rng.uniform(0.0, 1.0, size=max_blobs)) / max(num_classes, 1)  # hue
    blobs[:, 6] = rng.uniform(0.5, 1.0, size=max_blobs)  # saturation
    blobs[:, 7] = np.arange(max_blobs) < count  # on/off
    head = np.array([label, count, direction, *background.ravel()])
    return np.concatenate([head, blobs.ravel()])


def render_blobs(params: torch.Tensor, image_size: int, max_blobs: int) -> torch.Tensor:
    """Render a batch from packed parameters ``[B, 9 + 8 * max_blobs]`` -> ``[B, 3, H, W]``."""
    b = params.shape[0]
    p = params.float()
    centres = (torch.arange(image_size, dtype=torch.float32) + 0.5) / image_size
    yy, xx = centres[:, None], centres[None, :]  # [H, 1], [1, W]
    # background: linear gradient between two colours along a random direction
    direction = p[:, 2]
    ramp = (xx - 0.5) * torch.cos(direction)[:, None, None] + (yy - 0.5) * torch.sin(direction)[
        :, None, None
    ]
    ramp = (ramp / 1.4142 + 0.5).clamp(0, 1)  # [B, H, W]
    c0, c1 = p[:, 3:6], p[:, 6:9]
    image = c0[:, :, None, None] + (c1 - c0)[:, :, None, None] * ramp[:, None]
    blobs = p[:, 9:].reshape(b, max_blobs, 8)
    colours = _hsv_to_rgb(blobs[..., 5] % 1.0, blobs[..., 6], torch.ones_like(blobs[..., 6]))
    x = centres[None, None, :]  # coordinates are separable: dx is [B, 1, W], dy is [B, H, 1]
    y = centres[None, :, None]
    for k in range(max_blobs):  # composite back to front
        cx, cy, sx, sy, rot = (blobs[:, k, i][:, None, None] for i in range(5))
        cos, sin = torch.cos(rot), torch.sin(rot)
        # rotated anisotropic Gaussian as a quadratic form a·dx² + 2b·dx·dy + c·dy²
        qa = (cos / sx) ** 2 + (sin / sy) ** 2
        qb = cos * sin * (1 / sx**2 - 1 / sy**2)
        qc = (sin / sx) ** 2 + (cos / sy) ** 2
        dx, dy = x - cx, y - cy
        quad = (qa * dx * dx) + (2 * qb * dx) * dy + qc * dy * dy
        alpha = torch.exp(-0.5 * quad) * blobs[:, k, 7][:, None, None]
        alpha = alpha[:, None]
        image = torch.lerp(image, colours[:, k, :, None, None], alpha)
    return image.clamp(0, 1)


class ProcBlobs(Dataset):
    """``length`` procedural images of ``image_size``², items ``(image [3, H, W] float, label)``.

    Deterministic by ``(seed, index)``; ``__getitems__`` renders a whole batch at once.
    """

    def __init__(
        self,
        length: int = 50_000,
        image_size: int = 64,
        max_blobs: int = 5,
        num_classes: int = 0,
        seed: int = 0,
        offset: int = 0,
    ) -> None:
        if image_size < 4 or max_blobs < 2 or length < 1:
            raise ValueError("proc_blobs needs image_size >= 4, max_blobs >= 2 and length >= 1")
        self.length = length
        self.image_size = image_size
        self.max_blobs = max_blobs
        self.num_classes = num_classes
        self.seed = seed
        self.offset = offset  # first index, so splits are disjoint ranges of one stream

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (3, self.image_size, self.image_size)

    def __len__(self) -> int:
        return self.length

    def params_of(self, indices: Sequence[int]) -> torch.Tensor:
        rows = [
            _draw_params(self.seed, self.offset + int(i), self.max_blobs, self.num_classes)
            for i in indices
        ]
        return torch.from_numpy(np.stack(rows))

    def get_batch(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        for i in indices:
            if not 0 <= int(i) < self.length:
                raise IndexError(f"index {i} out of range for proc_blobs of length {self.length}")
        params = self.params_of(indices)
        images = render_blobs(params, self.image_size, self.max_blobs)
        return images, params[:, 0].long()

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = self.get_batch([index])
        return images[0], labels[0]

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        images, labels = self.get_batch(indices)
        return list(zip(images, labels, strict=True))
