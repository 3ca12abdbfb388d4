"""Procedural 3D Shapes: the 3D Shapes factor grid rendered in-process, batched, deterministic.

Mimics DeepMind's 3D Shapes (``shared/specs/datasets.md`` §2, §11) without any download: same
factor names, order, sizes, value grids and bases, 3x64x64 RGB images. It is **not**
pixel-identical to the real set; results must carry the dataset name ``proc_shapes3d``.

The scene is 2.5-D, seen by an orthographic camera looking down at ``ELEVATION``:

- **Room**: a floor band at the bottom and a wall band at the top that meet in a shallow V at the
  room's corner; floor, wall and object are coloured by their HSV hues (0 ... 0.9 of the colour
  circle). The floor brightens towards the viewer, the wall towards the floor, and the two walls
  left and right of the corner are shaded differently.
- **Object**, standing at the centre of the floor and scaled by ``scale``: a cube (square with
  its top face), a cylinder (rectangle with an elliptic top), a sphere (shaded disc) or a capsule
  lying on the floor (stadium). Side faces and curved surfaces are Lambert-shaded by one light;
  a soft shadow darkens the floor under the object.
- **Orientation** (-30 ... 30 degrees) turns the camera about the vertical axis, as in the real
  set: the cube shows one or two side faces of varying width, the capsule turns and foreshortens,
  the light moves across curved surfaces and the room's corner slides sideways. So every
  orientation class changes the image, for every shape.

Rendering is deferred shading. An image is ``obj_rgb * P + floor_rgb * Q + wall_rgb * R`` where
the layers P (shaded object coverage), Q (shaded, shadowed visible floor) and R (shaded visible
wall) depend only on (scale, shape, orientation). At construction the layers of those
``8 * 4 * 15 = 480`` combinations are rendered in one vectorised torch pass (float64, then
float32; 24 MB); ``images_of`` gathers the layers of a batch and mixes in the three hue colours.
The full grid of 480,000 images is never stored.

Determinism: layers use only +, -, *, / and sqrt per pixel (correctly rounded in every code
path) on per-class tables, and the colour mix is separate elementwise multiplies and adds (no
fused ops), so the same factors give the same bytes regardless of batch composition or thread
count.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch

from latentzoo.data.datasets.factors import FactorDataset, IndexLike, _as_int64_array

__all__ = ["ProcShapes3D"]

#: Factor sizes (floor_hue, wall_hue, object_hue, scale, shape, orientation) of each grid size.
GRIDS: dict[str, tuple[int, ...]] = {
    "full": (10, 10, 10, 8, 4, 15),
    "small": (4, 4, 4, 3, 4, 5),
}
SHAPES: tuple[str, ...] = ("cube", "cylinder", "sphere", "capsule")
CUBE, CYLINDER, SPHERE, CAPSULE = range(4)  # shape classes, in 3D Shapes' order

CANVAS = 64  # image height and width in pixels
CHUNK = 64  # images per internal chunk of the colour mix
X_CENTRE = 32.0  # column of the object's vertical axis (continuous px)
Y_GROUND = 50.0  # row where the object's base centre touches the floor
HORIZON = 33.0  # row of the floor/wall edge at the room's corner
HORIZON_SLOPE = 0.16  # rows the floor/wall edge drops per pixel away from the corner
CORNER_SWING = 36.0  # the corner sits at X_CENTRE - CORNER_SWING * sin(orientation)
ELEVATION = math.asin(0.35)  # camera pitch: vertical extents * cos, depths * sin
SIN_E, COS_E = math.sin(ELEVATION), math.cos(ELEVATION)

# Object sizes at scale 1, in pixels.
CUBE_HALF = 8.0  # half side of the cube
CYL_RADIUS, CYL_HEIGHT = 7.5, 17.0
SPHERE_RADIUS = 9.0
CAPSULE_RADIUS, CAPSULE_HALF_AXIS = 6.0, 8.0  # radius and half-length of the axis segment

# Lighting: unit vector towards the light in the room's frame (x right, y up, z into the scene),
# ambient + diffuse <= 1 so that shaded colours stay in [0, 1].
_LIGHT = np.array([-0.45, 0.75, -0.5]) / np.linalg.norm([-0.45, 0.75, -0.5])
AMBIENT, DIFFUSE = 0.4, 0.6
SATURATION = {"floor": 0.75, "wall": 0.7, "object": 0.9}
LEFT_WALL_SHADE, RIGHT_WALL_SHADE = 0.8, 1.0
SHADOW_STRENGTH = 0.45


def hsv_to_rgb(hue: np.ndarray, saturation: float, value: float = 1.0) -> np.ndarray:
    """HSV -> RGB (float64, ``hue.shape + (3,)``), hue in [0, 1) of the colour circle."""
    hue = np.asarray(hue, dtype=np.float64)[..., None]
    k = (np.array([5.0, 3.0, 1.0]) + 6.0 * hue) % 6.0
    return value - value * saturation * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)


class ProcShapes3D(FactorDataset):
    """Procedural 3D Shapes: factors (floor_hue, wall_hue, object_hue, scale, shape, orientation).

    Args:
        size: ``"full"`` for the 3D Shapes grid (10, 10, 10, 8, 4, 15) = 480,000 images, or
            ``"small"`` for (4, 4, 4, 3, 4, 5) = 3,840 images (CPU tests). Value grids are the
            3D Shapes linspaces with these counts (same ranges).
        indices: optional grid indices restricting the dataset to a subset (see FactorDataset).

    Images are float32 (3, 64, 64) in [0, 1]; ``images_u8_of`` gives uint8.
    """

    factor_names = ("floor_hue", "wall_hue", "object_hue", "scale", "shape", "orientation")
    image_shape = (3, CANVAS, CANVAS)
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
        """3D Shapes grids: hues [0, 0.9], scale [0.75, 1.25], shape 0..3, orientation [-30, 30]."""
        n_fh, n_wh, n_oh, n_scale, n_shape, n_orient = self.factor_sizes
        return (
            np.linspace(0.0, 0.9, n_fh),
            np.linspace(0.0, 0.9, n_wh),
            np.linspace(0.0, 0.9, n_oh),
            np.linspace(0.75, 1.25, n_scale),
            np.arange(n_shape, dtype=np.float64),
            np.linspace(-30.0, 30.0, n_orient),
        )

    # ------------------------------------------------------------------ tables
    def _build_tables(self) -> None:
        """Colour tables per hue class and the (P, Q, R) layers per (scale, shape, orientation)."""
        fh, wh, oh, _, _, _ = self.factor_values
        self._floor_rgb = torch.from_numpy(hsv_to_rgb(fh, SATURATION["floor"])).float()
        self._wall_rgb = torch.from_numpy(hsv_to_rgb(wh, SATURATION["wall"])).float()
        self._object_rgb = torch.from_numpy(hsv_to_rgb(oh, SATURATION["object"])).float()
        n_scale, n_shape, n_orient = self.factor_sizes[3:]
        grid = torch.cartesian_prod(
            torch.arange(n_scale), torch.arange(n_shape), torch.arange(n_orient)
        )
        layers = self.render_layers(grid[:, 0], grid[:, 1], grid[:, 2])
        # (combos, 3 layers, H * W), combo = (scale * n_shape + shape) * n_orient + orientation
        self._layers = layers.reshape(len(grid), 3, CANVAS * CANVAS).float().contiguous()
        self._combo_bases = torch.tensor([n_shape * n_orient, n_orient, 1], dtype=torch.int64)

    def render_layers(
        self, scale_c: torch.Tensor, shape_c: torch.Tensor, orient_c: torch.Tensor
    ) -> torch.Tensor:
        """Render the (P, Q, R) layers of M (scale, shape, orientation) classes: (M, 3, H, W) f64.

        P = object coverage x object shading; Q = visible floor x floor shading x shadow;
        R = visible wall x wall shading. P + Q + R <= 1 per pixel.
        """
        _, _, _, scales, _, orients = self.factor_values
        # Per-class tables in numpy float64 (round-off such as sin(0) snapped to 0), then gathered.
        theta = np.deg2rad(orients)
        cos_tab, sin_tab = np.cos(theta), np.sin(theta)
        cos_tab[np.abs(cos_tab) < 1e-12] = 0.0
        sin_tab[np.abs(sin_tab) < 1e-12] = 0.0
        scale = torch.from_numpy(scales)[scale_c]
        cos, sin = torch.from_numpy(cos_tab)[orient_c], torch.from_numpy(sin_tab)[orient_c]
        m = scale.shape[0]
        cov = torch.zeros(m, CANVAS, CANVAS, dtype=torch.float64)
        shade = torch.zeros_like(cov)
        extent = torch.zeros(m, dtype=torch.float64)  # half-width of the object on screen
        for shape_id in range(len(SHAPES)):
            sel = torch.nonzero(shape_c == shape_id).reshape(-1)
            if sel.numel() == 0:
                continue
            c, n_dot_l, half_width = _OBJECT_RENDERERS[shape_id](scale[sel], cos[sel], sin[sel])
            cov[sel], shade[sel], extent[sel] = c, _lambert_to_shade(n_dot_l), half_width
        floor, wall = _room(sin)
        shadow = _shadow(extent, scale)
        background = 1.0 - cov
        return torch.stack(
            (cov * shade, background * floor * shadow, background * wall), dim=1
        )  # (M, 3, H, W)

    # ------------------------------------------------------------------ rendering
    def images_of(self, factors: IndexLike) -> torch.Tensor:
        """Render factor classes (N, 6) (or one (6,) vector) as float32 (N, 3, 64, 64) in [0, 1]."""
        f = self._checked_factors(_as_int64_array(factors, "factors"))
        f = torch.from_numpy(np.ascontiguousarray(f.reshape(-1, self.num_factors)))
        combo = f[:, 3:] @ self._combo_bases
        obj = self._object_rgb.index_select(0, f[:, 2])[:, :, None]  # (N, 3, 1)
        floor = self._floor_rgb.index_select(0, f[:, 0])[:, :, None]
        wall = self._wall_rgb.index_select(0, f[:, 1])[:, :, None]
        n = f.shape[0]
        out = torch.empty(n, 3, CANVAS * CANVAS, dtype=torch.float32)
        # Chunks keep the gathered layers and temporaries cache-sized.
        for start in range(0, n, CHUNK):
            sl = slice(start, start + CHUNK)
            layers = self._layers.index_select(0, combo[sl])  # (c, 3 layers, H * W)
            dst = out[sl]
            torch.mul(layers[:, 0:1], obj[sl], out=dst)
            tmp = layers[:, 1:2] * floor[sl]
            dst += tmp
            torch.mul(layers[:, 2:3], wall[sl], out=tmp)
            dst += tmp
        return out.view(n, 3, CANVAS, CANVAS)

    def images_u8_of(self, factors: IndexLike) -> torch.Tensor:
        """Render factor classes (N, 6) as uint8 (N, 3, 64, 64) (rounded x255)."""
        return self.images_of(factors).mul_(255.0).round_().to(torch.uint8)

    def __repr__(self) -> str:
        return f"ProcShapes3D(size={self.size!r}, len={len(self)})"


# ---------------------------------------------------------------------- geometry helpers
#: What an object renderer returns for M combinations: coverage (M, H, W) in [0, 1], n.L (M, H, W)
#: (cosine between surface normal and light) and the half-width on screen (M,) for the shadow.
Rendered = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _pixel_grid() -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel centres: x relative to the object's axis (1, 1, W) and rows y (1, H, 1), float64."""
    centres = torch.arange(CANVAS, dtype=torch.float64) + 0.5
    return (centres - X_CENTRE).view(1, 1, CANVAS), centres.view(1, CANVAS, 1)


def _clamp01(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(0.0, 1.0)


def _light(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Light direction in the camera frame (x, z per combo; y fixed): the room turns by theta."""
    lx, ly, lz = (float(v) for v in _LIGHT)
    return lx * cos - lz * sin, lx * sin + lz * cos, ly


def _lambert_to_shade(n_dot_l: torch.Tensor) -> torch.Tensor:
    return AMBIENT + DIFFUSE * n_dot_l.clamp_min(0.0)


def _prism(
    zn: torch.Tensor,
    zf: torch.Tensor,
    dzn: torch.Tensor,
    half_width: torch.Tensor,
    height: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
) -> Rendered:
    """Coverage, n.L and half-width of an upright prism from per-column depths zn, zf (M, 1, W).

    Column x shows the top face between rows ``Y_GROUND - h cos(e) - z sin(e)`` for z in
    [zn, zf] and, below it, the near side wall down to ``Y_GROUND - zn sin(e)``; the side's
    normal is (dzn/dx, 0, -1) normalised.
    """
    x, y = _pixel_grid()
    h = height.view(-1, 1, 1)
    top_far = Y_GROUND - h * COS_E - zf * SIN_E
    top_near = Y_GROUND - h * COS_E - zn * SIN_E
    bottom = Y_GROUND - zn * SIN_E
    cov_y = _clamp01(torch.minimum(y - top_far, bottom - y) + 0.5)
    cov_x = _clamp01(half_width.view(-1, 1, 1) - x.abs() + 0.5)
    lx, lz, ly = _light(cos, sin)
    side = (dzn * lx.view(-1, 1, 1) - lz.view(-1, 1, 1)) / torch.sqrt(1.0 + dzn * dzn)
    in_top = _clamp01(top_near - y + 0.5)  # fraction of the pixel in the top face
    n_dot_l = in_top * ly + (1.0 - in_top) * side
    return cov_x * cov_y, n_dot_l, half_width


def _columns(half_width: torch.Tensor) -> torch.Tensor:
    """Column offsets (M, 1, W) clamped just inside the object's horizontal extent."""
    x, _ = _pixel_grid()
    w = (half_width - 1e-3).view(-1, 1, 1)
    return torch.maximum(torch.minimum(x, w), -w)


def _cube(scale: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> Rendered:
    """Cube of half side a turned by theta: the square |u|, |v| <= a with u = x c + z s and
    v = -x s + z c; each slab bounds z per column, the near face is the larger lower bound."""
    a = (CUBE_HALF * scale).view(-1, 1, 1)
    c, s = cos.view(-1, 1, 1), sin.view(-1, 1, 1)
    half_width = CUBE_HALF * scale * (cos.abs() + sin.abs())
    x = _columns(half_width)
    s_safe = torch.where(s.abs() < 1e-9, torch.full_like(s, 1e-9), s)
    u1, u2 = (-a - x * c) / s_safe, (a - x * c) / s_safe
    v1, v2 = (-a + x * s) / c, (a + x * s) / c
    zn_u, zf_u = torch.minimum(u1, u2), torch.maximum(u1, u2)
    zn = torch.maximum(zn_u, v1)
    zf = torch.minimum(zf_u, v2)
    dzn = torch.where(zn_u > v1, -c / s_safe, s / c)
    return _prism(zn, zf, dzn, half_width, 2.0 * CUBE_HALF * scale, cos, sin)


def _cylinder(scale: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> Rendered:
    """Upright cylinder: a disc cross-section (turning it changes only the lighting)."""
    r = CYL_RADIUS * scale
    x = _columns(r)
    rr = r.view(-1, 1, 1)
    depth = torch.sqrt(rr * rr - x * x)
    dzn = x / depth.clamp_min(0.25)
    return _prism(-depth, depth, dzn, r, CYL_HEIGHT * scale, cos, sin)


def _round(
    dx: torch.Tensor, dy: torch.Tensor, r: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Coverage and n.L of a round surface from pixel offsets (px; dy up) to its spine."""
    rr = r.view(-1, 1, 1)
    dist = torch.sqrt(dx * dx + dy * dy)
    cov = _clamp01(rr - dist + 0.5)
    nx, ny = dx / rr, dy / rr
    nz = torch.sqrt((1.0 - nx * nx - ny * ny).clamp_min(0.0))  # towards the camera
    lx, lz, ly = _light(cos, sin)
    lx, lz = lx.view(-1, 1, 1), lz.view(-1, 1, 1)
    # Screen right = x, screen up = (0, cos e, sin e), towards camera = (0, sin e, -cos e).
    n_dot_l = nx * lx + ny * (ly * COS_E + lz * SIN_E) + nz * (ly * SIN_E - lz * COS_E)
    return cov, n_dot_l


def _sphere(scale: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> Rendered:
    """Sphere resting on the floor: a disc centred ``r cos(e)`` above the ground point."""
    x, y = _pixel_grid()
    r = SPHERE_RADIUS * scale
    centre_row = (Y_GROUND - r * COS_E).view(-1, 1, 1)
    cov, n_dot_l = _round(x.expand(len(r), CANVAS, CANVAS), centre_row - y, r, cos, sin)
    return cov, n_dot_l, r


def _capsule(scale: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> Rendered:
    """Capsule lying on the floor, axis along x at theta = 0: a stadium around the projected
    axis, which turns and foreshortens with theta."""
    x, y = _pixel_grid()
    r = CAPSULE_RADIUS * scale
    half = CAPSULE_HALF_AXIS * scale
    # Axis end (x, row) relative to its centre; the other end is its mirror.
    ex = (half * cos).view(-1, 1, 1)
    ey = (-half * sin * SIN_E).view(-1, 1, 1)  # deeper end appears higher (smaller row)
    centre_row = (Y_GROUND - r * COS_E).view(-1, 1, 1)
    px, py = x, y - centre_row
    t = ((px * ex + py * ey) / (ex * ex + ey * ey)).clamp(-1.0, 1.0)
    dx, dy_down = px - t * ex, py - t * ey
    cov, n_dot_l = _round(dx, -dy_down, r, cos, sin)
    return cov, n_dot_l, half * cos.abs() + r


_OBJECT_RENDERERS = (_cube, _cylinder, _sphere, _capsule)


def _room(sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Shaded floor and wall weights (M, H, W): a V-shaped floor edge whose apex (the corner of
    the room) moves with the orientation; wall and floor brighten towards their common edge and
    the viewer respectively."""
    x, y = _pixel_grid()
    corner = (-CORNER_SWING * sin).view(-1, 1, 1)  # relative to X_CENTRE
    edge = HORIZON + HORIZON_SLOPE * (x - corner).abs()
    floor_frac = _clamp01(y - edge + 0.5)
    left = _clamp01(corner - x + 0.5)
    wall_side = left * LEFT_WALL_SHADE + (1.0 - left) * RIGHT_WALL_SHADE
    wall_shade = 0.72 + 0.28 * _clamp01(y / HORIZON)
    floor_shade = 0.62 + 0.38 * _clamp01((y - HORIZON) / (CANVAS - HORIZON))
    return floor_frac * floor_shade, (1.0 - floor_frac) * wall_side * wall_shade


def _shadow(extent: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Floor darkening (M, H, W) under the object: a soft ellipse, offset away from the light."""
    x, y = _pixel_grid()
    rx = (1.15 * extent + 1.0).view(-1, 1, 1)
    ry = (0.4 * extent + 1.0).view(-1, 1, 1)
    cx = (3.0 * scale).view(-1, 1, 1)
    e2 = ((x - cx) / rx) ** 2 + ((y - Y_GROUND - 1.0) / ry) ** 2
    falloff = _clamp01(1.0 - e2)
    return 1.0 - SHADOW_STRENGTH * falloff * falloff
