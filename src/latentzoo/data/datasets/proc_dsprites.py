"""Procedural dSprites: the dSprites factor grid rendered in-process, batched, deterministic.

Mimics deepmind's dSprites (``shared/specs/datasets.md`` §1, §11) without any download: same factor
names, order, sizes, value grids and bases, 1x64x64 binary images. It is **not** pixel-identical
to the real set; results must carry the dataset name ``proc_dsprites``.

Rendering (all in torch, vectorised over the batch, no per-image Python loop):

- Canvas coordinates are continuous pixels: column ``j`` covers x in [j, j+1), row ``i`` covers
  y in [i, i+1); x grows along image columns (width axis), y grows *down* the rows.
- Each shape is an implicit inside/outside test in its own frame (u right, v up), unit sizes at
  scale 1: square half-side 9.5 px (19 px wide); ellipse semi-axes 12.5 x 7.5 px, long axis
  horizontal at orientation 0; heart ``(u^2 + v^2 - 1)^3 - u^2 v^3 <= 0`` with 9.5 px per unit
  (about 21.6 x 21.2 px), lobes up, centred on its bounding box. Sizes are multiplied by ``scale``.
- Orientation rotates the shape counter-clockwise as seen on screen, about its centre.
- ``posX`` moves the centre along columns (x), ``posY`` along rows (y, downwards):
  ``centre = MARGIN + pos * (64 - 2 * MARGIN)`` with ``MARGIN = 10`` px, i.e. centres span
  pixels 10..54. A scale-1 shape reaches at most ~13.4 px from its centre, so at extreme
  positions only corners of rotated shapes are clipped (a few px), as in dSprites.
- Each pixel is tested at 2x2 sub-sample points (offsets 0.25 and 0.75); it is on when at least
  half of them are inside (coverage >= 0.5). Pixel values are exactly {0, 1}.
- Only a 32x32 window around each shape is evaluated (the shape always fits in it), then pasted
  into the zero canvas; the window is clamped to the canvas so no padding is needed.

Documented symmetries (identical images for different factors), as in dSprites:

- orientation uses ``linspace(0, 2*pi, n)`` including both ends, so the first and last
  orientation classes are the same angle for every shape;
- the square repeats every 90 degrees and the ellipse every 180 degrees; on the 40-step grid
  these are only approximate (e.g. square classes k and k+10 differ by 2.3 degrees) and such
  near-symmetric pairs can rasterise identically (seen for the square at small scales).

Determinism: per-class quantities (scales, cos/sin, centres, window offsets) are precomputed
tables gathered by class, and every per-pixel quantity is a chain of separate elementwise
float32 ops, so the same factors give the same bytes regardless of batch composition, chunking
or thread count.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch

from latentzoo.data.datasets.factors import FactorDataset, IndexLike, _as_int64_array

__all__ = ["ProcDSprites"]

#: Factor sizes (color, shape, scale, orientation, posX, posY) of each grid size.
GRIDS: dict[str, tuple[int, ...]] = {
    "full": (1, 3, 6, 40, 32, 32),
    "small": (1, 3, 3, 8, 8, 8),
}
SHAPES: tuple[str, ...] = ("square", "ellipse", "heart")
SQUARE, ELLIPSE, HEART = range(3)  # shape classes, in dSprites' order

CANVAS = 64  # image height and width in pixels
MARGIN = 10.0  # centre of pos=0 / pos=1 lies this many pixels from the border
WINDOW = 32  # side of the evaluation window around each shape, in pixels
SUPERSAMPLE = 2  # sub-samples per pixel along each axis
CHUNK = 64  # images per internal chunk (keeps temporaries cache-sized)

# Shape geometry at scale 1: (pixels per unit along u, pixels per unit along v, v offset in units).
_SQUARE_HALF = 9.5
_ELLIPSE_AXES = (12.5, 7.5)
_HEART_UNIT = 9.5
_HEART_V_SHIFT = 0.118  # centre of the heart's bounding box (v in [-1, 1.236]) sits at 0
_SHAPE_FRAMES: tuple[tuple[float, float, float], ...] = (
    (_SQUARE_HALF, _SQUARE_HALF, 0.0),
    (_ELLIPSE_AXES[0], _ELLIPSE_AXES[1], 0.0),
    (_HEART_UNIT, _HEART_UNIT, _HEART_V_SHIFT),
)
# Largest distance (px, scale 1) of any inside point from the shape centre, used to check WINDOW.
_SHAPE_RADII = (_SQUARE_HALF * math.sqrt(2.0), _ELLIPSE_AXES[0], _HEART_UNIT * 1.3367)


class ProcDSprites(FactorDataset):
    """Procedural dSprites: factors (color, shape, scale, orientation, posX, posY).

    Args:
        size: ``"full"`` for the dSprites grid (1, 3, 6, 40, 32, 32) = 737,280 images, or
            ``"small"`` for (1, 3, 3, 8, 8, 8) = 4,608 images (CPU tests). Value grids are the
            dSprites linspaces with these counts.
        indices: optional grid indices restricting the dataset to a subset (see FactorDataset).

    Images are float32 (1, 64, 64) with values in {0, 1}; ``images_u8_of`` gives uint8.
    """

    factor_names = ("color", "shape", "scale", "orientation", "posX", "posY")
    image_shape = (1, CANVAS, CANVAS)
    shape_names = SHAPES

    def __init__(
        self, size: Literal["full", "small"] = "full", indices: IndexLike | None = None
    ) -> None:
        if size not in GRIDS:
            raise ValueError(f"size must be one of {sorted(GRIDS)}, got {size!r}")
        self.size = size
        self.factor_sizes = GRIDS[size]
        super().__init__(indices)
        self._build_tables()

    # ------------------------------------------------------------------ value grids
    @property
    def factor_values(self) -> tuple[np.ndarray, ...]:
        """dSprites value grids: color 1, shape 1..3, scale [0.5, 1], orient [0, 2pi], pos [0,1]."""
        _, n_shape, n_scale, n_orient, n_x, n_y = self.factor_sizes
        return (
            np.ones(1),
            np.arange(1, n_shape + 1, dtype=np.float64),
            np.linspace(0.5, 1.0, n_scale),
            np.linspace(0.0, 2.0 * np.pi, n_orient),
            np.linspace(0.0, 1.0, n_x),
            np.linspace(0.0, 1.0, n_y),
        )

    # ------------------------------------------------------------------ precomputed tables
    def _build_tables(self) -> None:
        """Per-class lookup tables (float32), computed once in float64 for determinism."""
        _, _, scales, angles, pos_x, pos_y = self.factor_values
        if max(_SHAPE_RADII) * scales.max() + 1.0 > WINDOW / 2:
            raise AssertionError("WINDOW too small for the largest shape")
        self._inv_scale = torch.from_numpy(1.0 / scales).float()
        # Snap round-off (e.g. sin(2*pi) = -2.4e-16) to 0 so that angles 0 and 2*pi, which the
        # dSprites grid both contains, render exactly alike.
        cos, sin = np.cos(angles), np.sin(angles)
        cos[np.abs(cos) < 1e-9] = 0.0
        sin[np.abs(sin) < 1e-9] = 0.0
        self._cos = torch.from_numpy(cos).float()
        self._sin = torch.from_numpy(sin).float()
        # Per-shape frame: 1/(px per unit) along u and v, and the v offset (units).
        frames = np.asarray(_SHAPE_FRAMES, dtype=np.float64)
        self._inv_unit_u = torch.from_numpy(1.0 / frames[:, 0]).float()
        self._inv_unit_v = torch.from_numpy(1.0 / frames[:, 1]).float()
        self._v_shift = torch.from_numpy(frames[:, 2]).float()
        self._win_x0, self._win_dx = self._window_tables(pos_x)
        self._win_y0, self._win_dy = self._window_tables(pos_y)
        # Offset of window pixel (i, j) inside a flattened canvas.
        ii = torch.arange(WINDOW, dtype=torch.int64)
        self._win_flat = (ii[:, None] * CANVAS + ii[None, :]).reshape(1, WINDOW, WINDOW)
        names = ("inv_scale", "cos", "sin", "inv_unit_u", "inv_unit_v", "win_x0", "win_dx")
        names += ("win_y0", "win_dy", "win_flat")
        # per device (the CPU's, and a copy per GPU that images_on_device renders on)
        self._device_tables = {torch.device("cpu"): {k: getattr(self, f"_{k}") for k in names}}

    @staticmethod
    def _window_tables(pos_values: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Per position class: window origin (px, int64) and sub-sample offsets from the centre.

        Returns ``origin (n,)`` and ``delta (n, WINDOW * SUPERSAMPLE)`` where ``delta[c, s]`` is the
        coordinate of sub-sample ``s`` of the window minus the shape centre, in pixels.
        """
        centre = MARGIN + pos_values * (CANVAS - 2.0 * MARGIN)
        origin = np.clip(np.floor(centre) - WINDOW // 2, 0, CANVAS - WINDOW).astype(np.int64)
        sub = (np.arange(WINDOW * SUPERSAMPLE) + 0.5) / SUPERSAMPLE
        delta = origin[:, None] + sub[None, :] - centre[:, None]
        return torch.from_numpy(origin), torch.from_numpy(delta).float()

    # ------------------------------------------------------------------ rendering
    def images_of(self, factors: IndexLike) -> torch.Tensor:
        """Render factor classes (N, 6) (or one (6,) vector) as float32 (N, 1, 64, 64) in {0, 1}."""
        return self.images_u8_of(factors).to(torch.float32)

    def images_u8_of(self, factors: IndexLike) -> torch.Tensor:
        """Render factor classes (N, 6) (or one (6,) vector) as uint8 (N, 1, 64, 64) in {0, 1}."""
        f = self._checked_factors(_as_int64_array(factors, "factors"))
        f = torch.from_numpy(np.ascontiguousarray(f.reshape(-1, self.num_factors)))
        return self._render(f)

    def images_on_device(self, factors: torch.Tensor) -> torch.Tensor:
        """Render factor classes (N, 6), an int64 tensor on any device, as float32 images on
        that device (e.g. a batch of factors already moved to the GPU: no host rendering, no
        image transfer). The same ops on the same tables as on the CPU."""
        f = factors.reshape(-1, self.num_factors).long()
        if f.device.type == "cpu":  # on a GPU the check would be a host sync per batch
            self._checked_factors(f.numpy())
        return self._render(f).to(torch.float32)

    def _tables_on(self, device: torch.device) -> dict[str, torch.Tensor]:
        if device not in self._device_tables:
            self._device_tables[device] = {
                k: v.to(device) for k, v in self._device_tables[torch.device("cpu")].items()
            }
        return self._device_tables[device]

    def _render(self, f: torch.Tensor) -> torch.Tensor:
        """uint8 (N, 1, 64, 64) images of factor classes ``f`` (N, 6), on ``f``'s device."""
        n = f.shape[0]
        tables = self._tables_on(f.device)
        out = torch.zeros(n * CANVAS * CANVAS, dtype=torch.uint8, device=f.device)
        for shape_id in range(len(SHAPES)):
            rows = torch.nonzero(f[:, 1] == shape_id).reshape(-1)
            for start in range(0, rows.numel(), CHUNK):
                sel = rows[start : start + CHUNK]
                self._render_into(out, sel, f[sel], shape_id, tables)
        return out.reshape(n, 1, CANVAS, CANVAS)

    def _render_into(
        self,
        out: torch.Tensor,
        rows: torch.Tensor,
        f: torch.Tensor,
        shape_id: int,
        tables: dict[str, torch.Tensor],
    ) -> None:
        """Render images ``rows`` (all of shape ``shape_id``) into the flat uint8 canvas ``out``."""
        scale_c, orient_c, x_c, y_c = f[:, 2], f[:, 3], f[:, 4], f[:, 5]
        inv_s = tables["inv_scale"][scale_c]
        cos, sin = tables["cos"][orient_c], tables["sin"][orient_c]
        ku = (inv_s * tables["inv_unit_u"][shape_id])[:, None]
        kv = (inv_s * tables["inv_unit_v"][shape_id])[:, None]
        dx = tables["win_dx"][x_c]  # (n, S) sub-sample x minus centre x, px
        dy = tables["win_dy"][y_c]  # (n, S) sub-sample y minus centre y, px (y down)
        # Shape frame (u right, v up): u = (cos dx - sin dy) / unit_u and
        # v = (-sin dx - cos dy) / unit_v, each split into a column part (x only) and a row part
        # (y only) so that only the final broadcast add and the inside test are per sub-sample.
        cos_, sin_ = cos[:, None], sin[:, None]
        u_col = dx * cos_ * ku
        u_row = dy * sin_ * ku
        v_col = dx * sin_ * kv
        v_row = dy * cos_ * kv
        u = u_col[:, None, :] - u_row[:, :, None]  # (n, S, S): [image, sub-row, sub-col]
        v = (v_col[:, None, :] + v_row[:, :, None]).neg_()
        if shape_id == HEART:
            v.add_(float(self._v_shift[shape_id]))
        inside = _inside(shape_id, u, v)
        # Coverage over each 2x2 block of sub-samples; pixel on when >= half of them are inside.
        cnt = inside.view(torch.uint8)
        cnt = cnt[:, 0::2, :] + cnt[:, 1::2, :]
        cnt = cnt[:, :, 0::2] + cnt[:, :, 1::2]
        pixels = (cnt >= 2).view(torch.uint8)
        base = rows * (CANVAS * CANVAS) + tables["win_y0"][y_c] * CANVAS + tables["win_x0"][x_c]
        out[(base[:, None, None] + tables["win_flat"]).reshape(-1)] = pixels.reshape(-1)

    def __repr__(self) -> str:
        return f"ProcDSprites(size={self.size!r}, len={len(self)})"


def _inside(shape_id: int, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Inside test of shape ``shape_id`` at frame coordinates (u, v); consumes u and v in place."""
    if shape_id == SQUARE:  # max(|u|, |v|) <= 1
        return torch.maximum(u.abs_(), v.abs_()).le(1.0)
    if shape_id == ELLIPSE:  # u^2 + v^2 <= 1 (axes folded into the units)
        return u.mul_(u).add_(v * v).le(1.0)
    # HEART: (u^2 + v^2 - 1)^3 <= u^2 v^3
    u2 = u.mul_(u)
    vp = v * v  # v^2, then v^3 below
    t = (u2 + vp).sub_(1.0)
    rhs = u2.mul_(vp.mul_(v))
    t3 = t * t
    return t3.mul_(t).le(rhs)
