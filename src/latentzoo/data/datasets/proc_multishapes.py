"""``proc_multishapes`` (datasets.md §11): the DLP shapes set, rendered in-process.

Each 3×64×64 image in [0, 1] holds 2–5 non-overlapping shapes (rectangle, ellipse, triangle)
whose width and height are 11–13 px, in random colours, on black. The layout is drawn by a
generator keyed by ``(seed, index)`` (bounding boxes placed by rejection so that they keep a
1 px gap); the pixels of a batch are rendered in one vectorised torch call from implicit shape
functions at pixel centres. The label is the number of shapes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = ["ProcMultiShapes", "render_multishapes"]

MAX_SHAPES = 5
SHAPES = ("rectangle", "ellipse", "triangle")


def _draw_layout(seed: int, index: int, image_size: int) -> np.ndarray:
    """[MAX_SHAPES, 9]: on, shape, centre row, centre col, height, width, r, g, b."""
    rng = np.random.default_rng([seed, index])
    count = int(rng.integers(2, MAX_SHAPES + 1))
    out = np.zeros((MAX_SHAPES, 9))
    boxes: list[tuple[float, float, float, float]] = []
    while len(boxes) < count:
        h, w = rng.integers(11, 14, size=2)
        r0, c0 = rng.integers(1, image_size - h), rng.integers(1, image_size - w)
        box = (r0 - 1, c0 - 1, r0 + h + 1, c0 + w + 1)  # with a 1 px gap
        if all(box[0] >= b[2] or box[2] <= b[0] or box[1] >= b[3] or box[3] <= b[1] for b in boxes):
            boxes.append(box)
            i = len(boxes) - 1
            colour = rng.uniform(0.2, 1.0, size=3)
            out[i] = [1, rng.integers(len(SHAPES)), r0 + h / 2, c0 + w / 2, h, w, *colour]
    return out


def render_multishapes(layout: torch.Tensor, image_size: int) -> torch.Tensor:
    """Render [B, MAX_SHAPES, 9] layouts -> [B, 3, H, W] float in [0, 1]."""
    p = layout.float()
    centres = torch.arange(image_size, dtype=torch.float32) + 0.5
    rows, cols = centres.view(1, 1, -1, 1), centres.view(1, 1, 1, -1)
    on, kind = p[..., 0, None, None], p[..., 1, None, None]
    dr = (rows - p[..., 2, None, None]) / (p[..., 4, None, None] / 2)  # [-1, 1] inside the box
    dc = (cols - p[..., 3, None, None]) / (p[..., 5, None, None] / 2)
    rect = (dr.abs() <= 1) & (dc.abs() <= 1)
    ellipse = dr**2 + dc**2 <= 1
    triangle = (dr.abs() <= 1) & (dc.abs() <= (dr + 1) / 2)  # apex up
    inside = torch.where(kind == 0, rect, torch.where(kind == 1, ellipse, triangle)) & (on > 0)
    colour = p[..., 6:9, None, None]  # [B, S, 3, 1, 1]
    return (inside.unsqueeze(2).float() * colour).sum(1).clamp(0, 1)  # shapes do not overlap


class ProcMultiShapes(Dataset):
    """``length`` images from index ``offset`` on; ``__getitems__`` renders a batch at once."""

    def __init__(
        self, length: int = 40_000, image_size: int = 64, seed: int = 0, offset: int = 0
    ) -> None:
        if image_size < 32 or length < 1:
            raise ValueError("proc_multishapes needs image_size >= 32 and length >= 1")
        self.length, self.image_size, self.seed, self.offset = length, image_size, seed, offset

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (3, self.image_size, self.image_size)

    def __len__(self) -> int:
        return self.length

    def get_batch(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        for i in indices:
            if not 0 <= int(i) < self.length:
                raise IndexError(f"index {i} out of range for proc_multishapes of {self.length}")
        layout = np.stack(
            [_draw_layout(self.seed, self.offset + int(i), self.image_size) for i in indices]
        )
        layout_t = torch.from_numpy(layout)
        return render_multishapes(layout_t, self.image_size), layout_t[..., 0].sum(1).long()

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = self.get_batch([index])
        return images[0], labels[0]

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        images, labels = self.get_batch(indices)
        return list(zip(images, labels, strict=True))
