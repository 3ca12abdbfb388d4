"""Random thin-plate-spline (TPS) warps, as DLP builds its CelebA prior pairs (DVE's warper).

A warp is a sampling grid ``g(p)`` over the output pixels ``p = (x, y)`` in [-1, 1]
(``align_corners=True``, x along the width): ``out(p) = in(g(p))`` (bilinear, zero padding).
On a ``n_ctrl x n_ctrl`` lattice ``c_k`` of control points over [-1, 1]²,

    g(p) = Σ_k w_k U(|p - c_k|²) + t + A p,      U(r²) = r² log(r² + 1e-5),

with weights ``w [K, 2]`` and an affine part stored, like the original, as three rows
``[t; A^T]`` under ``w``: ``theta = [w; t; A^T]`` of shape ``[K + 3, 2]`` so that
``g = [U | 1 | p] @ theta``. The identity is ``w = 0, t = 0, A = I``.

Random draws (:func:`random_tps_theta`, DVE / DLP parameters): ``w ~ N(0, sd_all²)``, then a
random half of its entries re-drawn from ``N(0, sd_subset²)``; rotation ``N(0, rot_sd²)``
degrees, scale ``1 + N(0, scale_sd²)``, translation ``N(0, trans_sd²)`` per axis.

:class:`TPSPairWarper` makes the DLP CelebA pair from one image (160 px, crop 16): a mild warp
(every parameter scaled by 0.1) gives the posterior image; a second, full warp on top of it gives
the prior image, and both are cropped by 16 px per side -> 128 px.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "TPSPairWarper",
    "apply_tps",
    "control_lattice",
    "identity_theta",
    "pixel_lattice",
    "random_tps_theta",
    "solve_tps_theta",
    "tps_design_matrix",
    "tps_kernel",
]


def pixel_lattice(height: int, width: int) -> torch.Tensor:
    """Pixel centres (x, y) in [-1, 1] (align_corners=True), row-major: [H·W, 2]."""
    ys, xs = torch.meshgrid(
        torch.linspace(-1, 1, height), torch.linspace(-1, 1, width), indexing="ij"
    )
    return torch.stack([xs.reshape(-1), ys.reshape(-1)], 1)


def control_lattice(n: int) -> torch.Tensor:
    """The ``n x n`` control points over [-1, 1]²: [n², 2] (x, y)."""
    return pixel_lattice(n, n)


def tps_kernel(points: torch.Tensor, ctrl: torch.Tensor) -> torch.Tensor:
    """U(r²) = r² log(r² + 1e-5) between points [P, 2] and control points [K, 2]: [P, K]."""
    r2 = (points.unsqueeze(1) - ctrl.unsqueeze(0)).pow(2).sum(-1)
    return r2 * torch.log(r2 + 1e-5)


def tps_design_matrix(points: torch.Tensor, ctrl: torch.Tensor) -> torch.Tensor:
    """``[U | 1 | p]`` [P, K + 3]: the grid at ``points`` is this matrix times theta."""
    ones = points.new_ones(points.shape[0], 1)
    return torch.cat([tps_kernel(points, ctrl), ones, points], 1)


def identity_theta(n_ctrl: int, batch: int = 1) -> torch.Tensor:
    """theta of the identity warp: [B, n_ctrl² + 3, 2]."""
    theta = torch.zeros(batch, n_ctrl * n_ctrl + 3, 2)
    theta[:, -2:] = torch.eye(2)
    return theta


def random_tps_theta(
    batch: int,
    n_ctrl: int = 10,
    sd_all: float = 0.001,
    sd_subset: float = 0.01,
    trans_sd: float = 0.1,
    scale_sd: float = 0.1,
    rot_sd: float = 5.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Random warp parameters [B, n_ctrl² + 3, 2] (module docstring; rot_sd in degrees)."""
    k = n_ctrl * n_ctrl
    g = generator
    w = torch.randn(batch, k, 2, generator=g) * sd_all
    subset = torch.rand(batch, k, 2, generator=g) > 0.5
    w = torch.where(subset, torch.randn(batch, k, 2, generator=g) * sd_subset, w)
    rot = torch.randn(batch, generator=g) * rot_sd * math.pi / 180
    scale = 1 + torch.randn(batch, generator=g) * scale_sd
    shift = torch.randn(batch, 2, generator=g) * trans_sd
    cos, sin = scale * torch.cos(rot), scale * torch.sin(rot)
    # rows multiply (x, y): gx = .. + cos·x + sin·y, gy = .. - sin·x + cos·y (the original's)
    affine = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], 1)
    return torch.cat([w, shift.unsqueeze(1), affine], 1)


def solve_tps_theta(ctrl: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The interpolating TPS whose grid maps each control point ``ctrl[k]`` to ``targets[k]``
    (both [K, 2]): solves [[U, P], [P^T, 0]] theta = [targets; 0] -> theta [K + 3, 2]."""
    k = ctrl.shape[0]
    p = torch.cat([ctrl.new_ones(k, 1), ctrl], 1)  # [K, 3]
    system = torch.zeros(k + 3, k + 3, dtype=torch.float64)
    system[:k, :k] = tps_kernel(ctrl, ctrl).double()
    system[:k, k:] = p.double()
    system[k:, :k] = p.double().T
    rhs = torch.cat([targets.double(), targets.new_zeros(3, 2).double()])
    return torch.linalg.solve(system, rhs).to(ctrl.dtype)


def apply_tps(images: torch.Tensor, theta: torch.Tensor, design: torch.Tensor) -> torch.Tensor:
    """Warp images [B, C, H, W] by theta [B, K + 3, 2]; ``design`` = tps_design_matrix of the
    H x W pixel lattice (precomputed: it depends only on the sizes)."""
    b, _, h, w = images.shape
    grid = (design.to(images) @ theta.to(images)).reshape(b, h, w, 2)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=True)


class TPSPairWarper:
    """DLP's CelebA pair (``tps.Warper(H=160, W=160, im1_multiplier=0.1,
    im1_multiplier_aff=0.1)`` in the original): returns ``(image, prior_image)``, where
    ``image = crop(warp_1(x))`` with every warp_1 parameter scaled by ``mild`` (0.1) and
    ``prior_image = crop(warp_2(warp_1(x)))`` with the full parameters. x: [C, size, size]."""

    def __init__(
        self,
        size: int = 160,
        crop: int = 16,
        n_ctrl: int = 10,
        sd_all: float = 0.001,
        sd_subset: float = 0.01,
        trans_sd: float = 0.1,
        scale_sd: float = 0.1,
        rot_sd: float = 5.0,
        mild: float = 0.1,
        mild_affine: float = 0.1,
    ) -> None:
        self.size, self.crop, self.n_ctrl = size, crop, n_ctrl
        self.params = dict(
            sd_all=sd_all, sd_subset=sd_subset, trans_sd=trans_sd, scale_sd=scale_sd, rot_sd=rot_sd
        )
        self.mild, self.mild_affine = mild, mild_affine
        self._design: torch.Tensor | None = None  # built lazily (not pickled to workers)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_design": None}

    @property
    def design(self) -> torch.Tensor:
        if self._design is None:
            ctrl = control_lattice(self.n_ctrl)
            self._design = tps_design_matrix(pixel_lattice(self.size, self.size), ctrl)
        return self._design

    def _theta(self, scale: float, scale_affine: float, generator: torch.Generator | None):
        p = self.params
        return random_tps_theta(
            1,
            self.n_ctrl,
            sd_all=scale * p["sd_all"],
            sd_subset=scale * p["sd_subset"],
            trans_sd=scale_affine * p["trans_sd"],
            scale_sd=scale_affine * p["scale_sd"],
            rot_sd=scale_affine * p["rot_sd"],
            generator=generator,
        )

    def __call__(
        self, image: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if tuple(image.shape[-2:]) != (self.size, self.size):
            raise ValueError(f"TPSPairWarper({self.size}) got an image of {tuple(image.shape)}")
        x = image.unsqueeze(0).float()
        mild = apply_tps(x, self._theta(self.mild, self.mild_affine, generator), self.design)
        full = apply_tps(mild, self._theta(1.0, 1.0, generator), self.design)
        c = self.crop
        if c:
            mild, full = mild[..., c:-c, c:-c], full[..., c:-c, c:-c]
        return mild[0], full[0]
