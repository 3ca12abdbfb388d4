"""Matrix-exponential Glow blocks (MEF: Xiao & Liu, "Generative Flows with Matrix Exponential",
ICML 2020), as used by NFPI (spec nfpi.md §4).

Every layer maps ``x -> (y, logdet)`` with ``logdet`` of shape (B,) and has ``inverse(y)``.
Layers with data-dependent initialisation (ActNorm, the coupling nets' norms) initialise
themselves on their first forward call; ``Glow.data_init(x)`` does that on a chosen batch.

Flow step = ActNorm (per element) -> invertible 1x1 conv -> matrix-exp affine coupling.
The multi-scale "all_levels" flow squeezes, runs the steps, splits off half the channels at each
level but the last, and finally un-splits/un-squeezes, so ``z`` has the input shape.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def squeeze2d(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, 4C, H/2, W/2)."""
    b, c, h, w = x.shape
    if h % 2 or w % 2:
        raise ValueError(f"squeeze2d needs even height and width, got {h}x{w}")
    x = x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
    return x.reshape(b, 4 * c, h // 2, w // 2)


def unsqueeze2d(x: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`squeeze2d`."""
    b, c, h, w = x.shape
    x = x.reshape(b, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
    return x.reshape(b, c // 4, 2 * h, 2 * w)


def _inv_softplus(y: torch.Tensor) -> torch.Tensor:
    return y + torch.log(-torch.expm1(-y))


class ActNorm(nn.Module):
    """Per-element affine y = softplus(s)·x + b over (C, H, W); logdet = Σ log softplus(s).

    Data init: zero mean and unit std per element on the first batch seen."""

    def __init__(self, shape: Sequence[int]) -> None:
        super().__init__()
        self.s = nn.Parameter(torch.full(tuple(shape), _inv_softplus(torch.tensor(1.0)).item()))
        self.b = nn.Parameter(torch.zeros(tuple(shape)))
        self.register_buffer("initialized", torch.tensor(False))

    @torch.no_grad()
    def _init(self, x: torch.Tensor) -> None:
        mean, std = x.mean(0), x.std(0) if len(x) > 1 else torch.ones_like(x[0])
        scale = 1.0 / (std + 1e-6)
        self.s.copy_(_inv_softplus(scale.clamp(1e-4, 1e4)))
        self.b.copy_(-mean * F.softplus(self.s))
        self.initialized.fill_(True)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.initialized:
            self._init(x)
        scale = F.softplus(self.s)
        logdet = torch.log(scale).sum().expand(x.shape[0])
        return scale * x + self.b, logdet

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return (y - self.b) / F.softplus(self.s)


def _random_log_rotation(c: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """logm of a random special-orthogonal c×c matrix (real, skew-symmetric)."""
    from scipy.linalg import logm

    q, r = torch.linalg.qr(torch.randn(c, c, generator=generator, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))
    if torch.det(q) < 0:
        q[:, 0] = -q[:, 0]
    w = np.real(logm(q.numpy()))
    w = 0.5 * (w - w.T)  # remove round-off: logm of a rotation is skew-symmetric
    return torch.from_numpy(w).float()


class InvConv1x1(nn.Module):
    """Invertible 1×1 convolution.

    ``matrixexp``: weight expm(W), logdet = tr(W)·H·W (W init logm of a random rotation, so
    logdet starts at 0). ``conv``: plain weight W (random rotation init), logdet = slogdet(W)·H·W.
    """

    def __init__(self, channels: int, kind: str = "matrixexp") -> None:
        super().__init__()
        if kind not in ("matrixexp", "conv"):
            raise ValueError(f"invertible 1x1 conv kind must be 'matrixexp' or 'conv', got {kind}")
        self.kind = kind
        w = _random_log_rotation(channels)
        self.weight = nn.Parameter(w if kind == "matrixexp" else torch.linalg.matrix_exp(w))

    def _matrix(self, inverse: bool = False) -> torch.Tensor:
        if self.kind == "matrixexp":
            return torch.linalg.matrix_exp(-self.weight if inverse else self.weight)
        return torch.linalg.inv(self.weight) if inverse else self.weight

    def log_abs_det(self) -> torch.Tensor:
        """log |det| of the channel matrix (multiply by H·W for the layer)."""
        if self.kind == "matrixexp":
            return torch.diagonal(self.weight).sum()
        return torch.linalg.slogdet(self.weight)[1]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = x.shape[1]
        y = F.conv2d(x, self._matrix().view(c, c, 1, 1))
        logdet = (self.log_abs_det() * x.shape[2] * x.shape[3]).expand(x.shape[0])
        return y, logdet

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        c = y.shape[1]
        return F.conv2d(y, self._matrix(inverse=True).view(c, c, 1, 1))


class DataInitNorm(nn.Module):
    """Per-channel affine inside coupling nets, initialised to zero mean / unit std on the first
    batch (Glow's actnorm without a log-det: the nets need not be invertible)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.log_scale = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.register_buffer("initialized", torch.tensor(False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.initialized:
            with torch.no_grad():
                mean = x.mean((0, 2, 3), keepdim=True)
                std = x.std((0, 2, 3), keepdim=True) if x.numel() > x.shape[1] else 1.0
                self.log_scale.copy_(-torch.log(torch.as_tensor(std) + 1e-6))
                self.bias.copy_(-mean * self.log_scale.exp())
                self.initialized.fill_(True)
        return x * self.log_scale.exp() + self.bias


def _zero_conv(cin: int, cout: int, kernel: int) -> nn.Conv2d:
    conv = nn.Conv2d(cin, cout, kernel, padding=kernel // 2)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


class ResidualBlock(nn.Module):
    """x + [3×3 -> norm -> ELU -> 1×1 -> norm -> ELU -> 3×3 (zero-init)]."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(hidden, hidden, 3, padding=1),
            DataInitNorm(hidden),
            nn.ELU(),
            nn.Conv2d(hidden, hidden, 1),
            DataInitNorm(hidden),
            nn.ELU(),
            _zero_conv(hidden, hidden, 3),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class SelfAttention(nn.Module):
    """Multi-head self-attention over pixels with a zero-initialised output (residual)."""

    def __init__(self, hidden: int, heads: int = 6) -> None:
        super().__init__()
        self.heads, self.dim = heads, max(1, hidden // heads)
        self.norm = DataInitNorm(hidden)
        self.qkv = nn.Conv2d(hidden, 3 * heads * self.dim, 1)
        self.out = _zero_conv(heads * self.dim, hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.heads, self.dim, h * w).unbind(1)
        attn = F.scaled_dot_product_attention(
            q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2)
        )
        return x + self.out(attn.transpose(-1, -2).reshape(b, self.heads * self.dim, h, w))


class CouplingNet(nn.Module):
    """x_1 -> (c_2 + c_2²) channels: conv3×3 + norm + ELU, residual blocks, [attention],
    zero-initialised conv3×3."""

    def __init__(self, cin: int, cout: int, hidden: int, blocks: int, attention: bool) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(cin, hidden, 3, padding=1), DataInitNorm(hidden)]
        layers += [nn.ELU(), *[ResidualBlock(hidden) for _ in range(blocks)]]
        if attention:
            layers.append(SelfAttention(hidden))
        layers.append(_zero_conv(hidden, cout, 3))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class MatrixExpCoupling(nn.Module):
    """x_2' = expm(M(x_1))·x_2 + t(x_1) per pixel, logdet = Σ_pixels tr(M).

    M is squashed as r·tanh(a·M + b) + d (a = 1/8, r = 1/c_2, b = d = 0 at init) so expm stays
    well conditioned; with the zero-initialised last conv the layer starts as the identity."""

    MAX_DENSE = 24  # MEF switches to a rank-2k series form above this; CIFAR/MNIST never do

    def __init__(self, channels: int, hidden: int, blocks: int, attention: bool = False) -> None:
        super().__init__()
        self.c1 = math.ceil(channels / 2)
        self.c2 = channels - self.c1
        if self.c2 > self.MAX_DENSE:
            raise NotImplementedError(
                f"matrix-exp coupling with c_2={self.c2} > {self.MAX_DENSE} channels needs MEF's "
                "rank-2k series form, which is not implemented; use fewer levels or channels"
            )
        self.net = CouplingNet(self.c1, self.c2 * (self.c2 + 1), hidden, blocks, attention)
        self.a = nn.Parameter(torch.tensor(1.0 / 8))
        self.r = nn.Parameter(torch.tensor(1.0 / self.c2))
        self.b = nn.Parameter(torch.tensor(0.0))
        self.d = nn.Parameter(torch.tensor(0.0))

    def _params(self, x1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.net(x1)
        b, _, h, w = out.shape
        t = out[:, : self.c2]
        m = out[:, self.c2 :].reshape(b, self.c2, self.c2, h, w).permute(0, 3, 4, 1, 2)
        m = m.contiguous()
        m = self.r * torch.tanh(self.a * m + self.b) + self.d  # (B, H, W, c2, c2)
        return t, m

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x1, x2 = x[:, : self.c1], x[:, self.c1 :]
        t, m = self._params(x1)
        x2 = torch.einsum("bhwij,bjhw->bihw", torch.linalg.matrix_exp(m), x2) + t
        logdet = torch.diagonal(m, dim1=-2, dim2=-1).sum((1, 2, 3))
        return torch.cat([x1, x2], 1), logdet

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        y1, y2 = y[:, : self.c1], y[:, self.c1 :]
        t, m = self._params(y1)
        x2 = torch.einsum("bhwij,bjhw->bihw", torch.linalg.matrix_exp(-m), y2 - t)
        return torch.cat([y1, x2], 1)


class FlowStep(nn.Module):
    """ActNorm -> invertible 1×1 conv -> matrix-exp coupling."""

    def __init__(
        self,
        shape: Sequence[int],
        hidden: int,
        blocks: int,
        conv: str = "matrixexp",
        attention: bool = False,
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            [
                ActNorm(shape),
                InvConv1x1(shape[0], conv),
                MatrixExpCoupling(shape[0], hidden, blocks, attention),
            ]
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logdet = x.new_zeros(x.shape[0])
        for layer in self.layers:
            x, ld = layer(x)
            logdet = logdet + ld
        return x, logdet

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        for layer in reversed(self.layers):
            y = layer.inverse(y)
        return y


class Glow(nn.Module):
    """Multi-scale MEF flow, "all_levels" method: ``forward(x) -> (z, logdet)`` with z of the
    input shape, ``inverse(z) -> x``.

    Args:
        image_shape: (C, H, W); H and W divisible by 2^levels.
        levels: number of squeeze levels L (a split after every level but the last).
        steps: flow steps per level (int or one per level).
        blocks: residual blocks per coupling net (int or one per level).
        hidden: hidden channels of the coupling nets.
        conv: invertible 1×1 conv kind, ``matrixexp`` or ``conv``.
        attention: add a self-attention block to every coupling net.
    """

    def __init__(
        self,
        image_shape: Sequence[int],
        levels: int = 3,
        steps: int | Sequence[int] = 8,
        blocks: int | Sequence[int] = (8, 4, 2),
        hidden: int = 128,
        conv: str = "matrixexp",
        attention: bool = False,
    ) -> None:
        super().__init__()
        c, h, w = (int(v) for v in image_shape)
        if h % 2**levels or w % 2**levels:
            raise ValueError(f"image size {h}x{w} is not divisible by 2^levels = {2**levels}")
        steps = [steps] * levels if isinstance(steps, int) else list(steps)
        blocks = [blocks] * levels if isinstance(blocks, int) else list(blocks)
        if len(steps) != levels or len(blocks) != levels:
            raise ValueError(
                f"steps {steps} and blocks {blocks} need one entry per level ({levels})"
            )
        self.image_shape = (c, h, w)
        self.levels = nn.ModuleList()
        for i in range(levels):
            c, h, w = 4 * c, h // 2, w // 2
            self.levels.append(
                nn.ModuleList(
                    FlowStep((c, h, w), hidden, blocks[i], conv, attention) for _ in range(steps[i])
                )
            )
            if i < levels - 1:
                c //= 2

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logdet = x.new_zeros(x.shape[0])
        stash = []
        for i, level in enumerate(self.levels):
            x = squeeze2d(x)
            for step in level:
                x, ld = step(x)
                logdet = logdet + ld
            if i < len(self.levels) - 1:
                x, rest = x.chunk(2, 1)
                stash.append(rest)
        for i in reversed(range(len(self.levels))):
            if i < len(self.levels) - 1:
                x = torch.cat([x, stash.pop()], 1)
            x = unsqueeze2d(x)
        return x, logdet

    def inverse(self, z: torch.Tensor) -> torch.Tensor:
        stash = []
        for i in range(len(self.levels)):  # undo the final un-split/un-squeeze
            z = squeeze2d(z)
            if i < len(self.levels) - 1:
                z, rest = z.chunk(2, 1)
                stash.append(rest)
        for i in reversed(range(len(self.levels))):
            for step in reversed(self.levels[i]):
                z = step.inverse(z)
            z = unsqueeze2d(z)
            if i > 0:
                z = torch.cat([z, stash.pop()], 1)
        return z

    @torch.no_grad()
    def data_init(self, x: torch.Tensor) -> None:
        """Data-dependent init of every ActNorm / norm layer from the batch ``x``."""
        for module in self.modules():
            if hasattr(module, "initialized"):
                module.initialized.fill_(False)
        self(x)
