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
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from latentzoo.models.nets.matrix_exp_taylor import (
    action_substeps,
    matrix_exp_action,
    matrix_exp_taylor,
)


def squeeze2d(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, 4C, H/2, W/2), channels ordered (row offset, column offset, channel)
    as MEF's, so the level splits keep the same sub-pixels as the release."""
    b, c, h, w = x.shape
    if h % 2 or w % 2:
        raise ValueError(f"squeeze2d needs even height and width, got {h}x{w}")
    x = x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 3, 5, 1, 2, 4)
    return x.reshape(b, 4 * c, h // 2, w // 2)


def unsqueeze2d(x: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`squeeze2d`."""
    b, c, h, w = x.shape
    x = x.reshape(b, 2, 2, c // 4, h, w).permute(0, 3, 4, 1, 5, 2)
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
    logdet starts at 0); ``expm='taylor'`` forms expm(W) without host synchronisation
    (:func:`matrix_exp_taylor`), ``'torch'`` with ``torch.linalg.matrix_exp``.
    ``conv``: plain weight W (random rotation init), logdet = slogdet(W)·H·W.
    """

    def __init__(self, channels: int, kind: str = "matrixexp", expm: str = "taylor") -> None:
        super().__init__()
        if kind not in ("matrixexp", "conv"):
            raise ValueError(f"invertible 1x1 conv kind must be 'matrixexp' or 'conv', got {kind}")
        if expm not in EXPM_KINDS:
            raise ValueError(f"expm must be one of {EXPM_KINDS}, got {expm!r}")
        self.kind = kind
        self.expm = expm
        w = _random_log_rotation(channels)
        self.weight = nn.Parameter(w if kind == "matrixexp" else torch.linalg.matrix_exp(w))

    def _matrix(self, inverse: bool = False) -> torch.Tensor:
        if self.kind == "matrixexp":
            w = -self.weight if inverse else self.weight
            return matrix_exp_taylor(w) if self.expm == "taylor" else torch.linalg.matrix_exp(w)
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


class Norm(nn.Module):
    """Per-channel y = scale·x + shift inside the coupling nets (MEF's ``Norm``: a linear scale,
    not a log-scale). The data init (called by :class:`NormConv2d`) sets zero mean and std
    ``init_scale`` per channel; ``init_scale=0`` makes the layer output zero."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(channels, 1, 1))
        self.shift = nn.Parameter(torch.zeros(channels, 1, 1))

    @torch.no_grad()
    def data_init(self, x: torch.Tensor, init_scale: float = 1.0) -> None:
        mean, std = _channel_moments(x)
        inv_std = init_scale / (std + _EPS)
        self.scale.copy_(inv_std.view_as(self.scale))
        self.shift.copy_((-mean * inv_std).view_as(self.shift))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * x + self.shift


_EPS = 1e-8  # MEF's epsilon in the data-init divisions


def _channel_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and (unbiased) std over batch and pixels."""
    flat = x.transpose(0, 1).reshape(x.shape[1], -1)
    return flat.mean(1), flat.std(1) if flat.shape[1] > 1 else torch.ones_like(flat[:, 0])


class NormConv2d(nn.Module):
    """MEF's coupling-net convolution: conv (no bias, Kaiming-uniform) -> :class:`Norm` [-> ELU].

    Data init on the first forward: the conv weight is divided per output channel by the std of
    the layer's current output (after the ELU when ``activation``), then the norm is initialised
    to zero mean and std ``init_scale`` (0 for the last conv of a residual block, so the block
    starts as ``ELU(x)``)."""

    def __init__(
        self,
        cin: int,
        cout: int,
        kernel: int,
        activation: bool = False,
        init_scale: float = 1.0,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False)
        nn.init.kaiming_uniform_(self.conv.weight)
        self.norm = Norm(cout)
        self.activation = activation
        self.init_scale = init_scale
        self.register_buffer("initialized", torch.tensor(False))

    def _conv_norm_act(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.conv(x))
        return F.elu(x) if self.activation else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.initialized:
            with torch.no_grad():
                _, std = _channel_moments(self._conv_norm_act(x))
                self.conv.weight.mul_((1.0 / (std + _EPS)).view(-1, 1, 1, 1))
                self.norm.data_init(self.conv(x), self.init_scale)
                self.initialized.fill_(True)
        return self._conv_norm_act(x)


def _zero_conv(cin: int, cout: int, kernel: int) -> nn.Conv2d:
    conv = nn.Conv2d(cin, cout, kernel, padding=kernel // 2)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


class ResidualBlock(nn.Module):
    """MEF's block: ELU(x + conv3(ELU(conv1x1(ELU(conv3(x)))))), every conv a
    :class:`NormConv2d`, the last one with a zero-initialised norm (ELU after the add)."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.conv1 = NormConv2d(hidden, hidden, 3)
        self.conv2 = NormConv2d(hidden, hidden, 1)
        self.conv3 = NormConv2d(hidden, hidden, 3, init_scale=0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.elu(self.conv1(x))
        out = F.elu(self.conv2(out))
        return F.elu(x + self.conv3(out))


class SelfAttention(nn.Module):
    """The attention block of the ImageNet32-pretrained NFPI flows (the guided-diffusion
    ``AttentionBlock``): per-channel GroupNorm, a 1×1 qkv projection laid out head by head
    (q, k, v inside each head), softmax(qᵀk/√d) attention over pixels, a zero-initialised 1×1
    output projection, and a residual connection."""

    def __init__(self, channels: int, heads: int = 6) -> None:
        super().__init__()
        if channels % heads:
            raise ValueError(
                f"attention over {channels} channels needs a multiple of {heads} heads"
            )
        self.heads = heads
        self.norm = nn.GroupNorm(channels, channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.out = nn.Conv1d(channels, channels, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        flat = x.reshape(b, c, h * w)
        qkv = self.qkv(self.norm(flat)).reshape(b, self.heads, 3 * c // self.heads, h * w)
        q, k, v = qkv.transpose(-1, -2).chunk(3, dim=-1)  # each (b, heads, pixels, d)
        attn = F.scaled_dot_product_attention(q, k, v)
        return (flat + self.out(attn.transpose(-1, -2).reshape(b, c, h * w))).view(b, c, h, w)


class CouplingNet(nn.Module):
    """x_1 -> (c_2 + c_2²) channels (MEF's ``ConvBlock``): NormConv2d 3×3 + ELU, residual
    blocks, a zero-initialised conv 3×3 and, for the ImageNet32-pretrained flows, the attention
    block *after* that output conv (on the c_2 + c_2² output channels, as the release)."""

    def __init__(self, cin: int, cout: int, hidden: int, blocks: int, attention: bool) -> None:
        super().__init__()
        layers: list[nn.Module] = [NormConv2d(cin, hidden, 3, activation=True)]
        layers += [ResidualBlock(hidden) for _ in range(blocks)]
        layers.append(_zero_conv(hidden, cout, 3))
        if attention:
            layers.append(SelfAttention(cout))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


EXPM_KINDS = ("taylor", "torch")


def _substeps_after_load(module: MatrixExpCoupling, _: Any) -> None:
    """Loaded weights bring their own bound: set the substeps at once (one read at load)."""
    module.substeps = action_substeps(module.norm_bound())
    module._published = None


class MatrixExpCoupling(nn.Module):
    """x_2' = expm(M(x_1))·x_2 + t(x_1) per pixel, logdet = Σ_pixels tr(M).

    M is squashed as r·tanh(a·M + b) + d (a = 1/8, r = 1/c_2, b = d = 0 at init) so expm stays
    well conditioned; with the zero-initialised output conv the layer starts as the identity.
    The net's output channels are laid out as MEF's: t first, then M column by column.

    ``expm='taylor'`` applies e^M to x_2 by :func:`matrix_exp_action` without any host
    synchronisation: every entry of M is at most |r| + |d|, so ‖M‖₁ ≤ c_2(|r| + |d|), and that
    bound, copied to the host without blocking after each forward, sets the number of Taylor
    substeps of the next call. ``expm='torch'`` forms ``torch.linalg.matrix_exp(M)``."""

    MAX_DENSE = 24  # MEF switches to a rank-2k series form above this; CIFAR/MNIST never do

    def __init__(
        self,
        channels: int,
        hidden: int,
        blocks: int,
        attention: bool = False,
        expm: str = "taylor",
    ) -> None:
        super().__init__()
        if expm not in EXPM_KINDS:
            raise ValueError(f"expm must be one of {EXPM_KINDS}, got {expm!r}")
        self.c1 = math.ceil(channels / 2)
        self.c2 = channels - self.c1
        if self.c2 > self.MAX_DENSE:
            raise NotImplementedError(
                f"matrix-exp coupling with c_2={self.c2} > {self.MAX_DENSE} channels needs MEF's "
                "rank-2k series form, which is not implemented; use fewer levels or channels"
            )
        out = self.c2 * (self.c2 + 1)
        if attention and out % 6:
            raise ValueError(
                f"the attention block needs c_2(c_2 + 1) divisible by its 6 heads; c_2 = {self.c2} "
                f"gives {out}: use attention only on the CIFAR-sized flow"
            )
        self.net = CouplingNet(self.c1, out, hidden, blocks, attention)
        self.a = nn.Parameter(torch.tensor(1.0 / 8))
        self.r = nn.Parameter(torch.tensor(1.0 / self.c2))
        self.b = nn.Parameter(torch.tensor(0.0))
        self.d = nn.Parameter(torch.tensor(0.0))
        self.expm = expm
        self.substeps = action_substeps(self.norm_bound())
        self._published: tuple[torch.Tensor, Any] | None = None
        self.register_load_state_dict_post_hook(_substeps_after_load)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_published"] = None  # a pending device copy and its CUDA event stay behind
        return state

    def norm_bound(self) -> torch.Tensor:
        """c_2(|r| + |d|) ≥ ‖M‖₁ for every pixel (|tanh| ≤ 1)."""
        return self.c2 * (self.r.detach().abs() + self.d.detach().abs())

    def _refresh_substeps(self) -> int:
        """Substeps from the bound published by the previous call, read only once the device
        has written it (never waits); then publish the current bound for the next call."""
        if self._published is not None:
            host, event = self._published
            if event is None or event.query():
                self.substeps = action_substeps(float(host))
                self._published = None
        if self._published is None:
            bound = self.norm_bound()
            if bound.is_cuda:
                host = torch.empty((), dtype=bound.dtype, pin_memory=True)
                host.copy_(bound, non_blocking=True)
                event = torch.cuda.Event()
                event.record()
                self._published = (host, event)
            else:
                self._published = (bound, None)
        return self.substeps

    def _params(self, x1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.net(x1)
        b, _, h, w = out.shape
        t = out[:, : self.c2]
        m = out[:, self.c2 :].reshape(b, self.c2, self.c2, h, w).permute(0, 3, 4, 2, 1)
        m = self.r * torch.tanh(self.a * m + self.b) + self.d  # (B, H, W, c2, c2)
        return t, m

    def _exp_times(self, m: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """e^M·x per pixel for m (B, H, W, c, c) and x (B, c, H, W)."""
        v = x.permute(0, 2, 3, 1)
        if self.expm == "torch":
            out = (torch.linalg.matrix_exp(m.contiguous()) @ v.unsqueeze(-1)).squeeze(-1)
        else:
            out = matrix_exp_action(m, v, self._refresh_substeps())
        return out.permute(0, 3, 1, 2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x1, x2 = x[:, : self.c1], x[:, self.c1 :]
        t, m = self._params(x1)
        x2 = self._exp_times(m, x2) + t
        logdet = torch.diagonal(m, dim1=-2, dim2=-1).sum((1, 2, 3))
        return torch.cat([x1, x2], 1), logdet

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        y1, y2 = y[:, : self.c1], y[:, self.c1 :]
        t, m = self._params(y1)
        return torch.cat([y1, self._exp_times(-m, y2 - t)], 1)


class FlowStep(nn.Module):
    """ActNorm -> invertible 1×1 conv -> matrix-exp coupling."""

    def __init__(
        self,
        shape: Sequence[int],
        hidden: int,
        blocks: int,
        conv: str = "matrixexp",
        attention: bool = False,
        expm: str = "taylor",
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            [
                ActNorm(shape),
                InvConv1x1(shape[0], conv, expm),
                MatrixExpCoupling(shape[0], hidden, blocks, attention, expm),
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
        attention: add the attention block after every coupling net's output conv (the
            ImageNet32-pretrained flows of the release).
        expm: ``taylor`` (matrix exponentials without host synchronisation, default) or
            ``torch`` (``torch.linalg.matrix_exp``; same values to float rounding).
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
        expm: str = "taylor",
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
                    FlowStep((c, h, w), hidden, blocks[i], conv, attention, expm)
                    for _ in range(steps[i])
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
