"""LFM's ``adm_guided`` backbone: OpenAI guided-diffusion's UNetModel (Dhariwal & Nichol,
"Diffusion Models Beat GANs on Image Synthesis", NeurIPS 2021).

Latent Flow Matching (Dao et al. 2023) uses it for CelebA-HQ 256/512 (its ``--use_origin_adm``
runs). Residual blocks with GroupNorm, time (and class) embedding injected by scale-shift norm
(``GN(h)·(1 + scale) + shift``), self-attention blocks after the res-blocks at chosen
resolutions and in the bottleneck, conv down/up-sampling as separate blocks (no res-block
up/down), skip connections, and zero-initialised last convs (so the velocity is 0 at init).
LFM's ``adm`` (EDM's DhariwalUNet) is ``unet_edm.py``.

Parameter names and the attention's qkv channel layout follow guided-diffusion's (its "legacy"
attention order), so an LFM ``adm_guided`` state dict loads as is (``import_lfm``).

``attention_resolutions`` are **latent spatial resolutions** (e.g. 4 for a 32×32 latent), not the
downsample rates of the guided-diffusion code (spec §4/§12.5): LFM's ``--attn_resolution 16 8``
with ``ch_mult 1 2 2 2`` means downsample rates 16 and 8, i.e. attention only at 4×4. The
conversion is logged at build time. ``num_classes = 0`` is unconditional; ``class_dropout`` > 0
adds a null label row (index ``num_classes``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from latentzoo.models.nets.dit import timestep_embedding
from latentzoo.utils.errors import LatentzooError

log = logging.getLogger(__name__)


def unet_levels(
    input_size: int, channel_mult: Sequence[int], attention_resolutions: Sequence[int]
) -> list[int]:
    """The latent resolution of each UNet level; refuses attention at a resolution no level has
    and a latent that cannot be halved once per level."""
    levels = [input_size >> i for i in range(len(channel_mult))]
    if bad := set(attention_resolutions) - set(levels):
        raise LatentzooError(
            f"attention_resolutions {sorted(bad)} are not latent resolutions of this UNet "
            f"(levels {levels} for a {input_size}x{input_size} latent)"
        )
    if input_size % (1 << (len(channel_mult) - 1)):
        raise LatentzooError(
            f"latent size {input_size} cannot be halved {len(channel_mult) - 1} times; "
            "use fewer channel_mult levels"
        )
    return levels


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(32, channels), channels)


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """h = in_layers(x); h = GN(h)·(1 + scale) + shift (or GN(h + e)); x + out_layers(h)."""

    def __init__(
        self, cin: int, cout: int, emb_dim: int, dropout: float, scale_shift: bool = True
    ) -> None:
        super().__init__()
        self.scale_shift = scale_shift
        self.in_layers = nn.Sequential(_norm(cin), nn.SiLU(), nn.Conv2d(cin, cout, 3, padding=1))
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_dim, 2 * cout if scale_shift else cout)
        )
        self.out_layers = nn.Sequential(
            _norm(cout), nn.SiLU(), nn.Dropout(dropout), _zero(nn.Conv2d(cout, cout, 3, padding=1))
        )
        self.skip_connection = nn.Identity() if cin == cout else nn.Conv2d(cin, cout, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        e = self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        out_norm, out_rest = self.out_layers[0], self.out_layers[1:]
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)
            h = out_rest(out_norm(h) * (1 + scale) + shift)
        else:
            h = self.out_layers(h + e)
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    """Self-attention over the pixels, residual; qkv channels in guided-diffusion's legacy
    layout (head, q/k/v, channel within head)."""

    def __init__(self, channels: int, heads: int = 4, head_channels: int | None = None) -> None:
        super().__init__()
        self.heads = channels // head_channels if head_channels else heads
        if channels % self.heads:
            raise LatentzooError(
                f"attention over {channels} channels cannot be split into {self.heads} heads; "
                "change num_heads / num_head_channels"
            )
        self.norm = _norm(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = _zero(nn.Conv1d(channels, channels, 1))

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x).reshape(b, c, h * w))
        q, k, v = rearrange(qkv, "b (h three d) n -> three b h n d", three=3, h=self.heads)
        out = rearrange(F.scaled_dot_product_attention(q, k, v), "b h n d -> b (h d) n")
        return x + self.proj_out(out).reshape(b, c, h, w)


class Downsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class _Seq(nn.ModuleList):
    """Applies layers in order, passing the embedding to those that take it."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for layer in self:
            x = layer(x, emb)
        return x


class ADMUNet(nn.Module):
    """guided-diffusion ADM UNet as a velocity net ``v(x, t, y)`` (LFM's ``adm_guided``).

    Args:
        in_channels: latent channels (output has the same).
        input_size: latent height/width; ``attention_resolutions`` refer to it.
        model_channels: width of the first level; level i has ``model_channels·channel_mult[i]``.
        num_res_blocks: res-blocks per level (the decoder has one more, as in ADM).
        attention_resolutions: latent resolutions with self-attention (plus the bottleneck).
        num_heads / num_head_channels: heads per attention (head_channels wins when set).
        use_scale_shift_norm: condition by GN(h)·(1 + s) + b (ADM) instead of adding.
        time_scale: multiplier on t before the sinusoid (t ∈ [0, 1]; LFM feeds raw t).
    """

    def __init__(
        self,
        in_channels: int = 4,
        input_size: int = 32,
        num_classes: int = 0,
        class_dropout: float = 0.0,
        model_channels: int = 128,
        channel_mult: tuple[int, ...] | list[int] = (1, 2, 2, 2),
        num_res_blocks: int = 2,
        attention_resolutions: tuple[int, ...] | list[int] = (16, 8),
        num_heads: int = 4,
        num_head_channels: int | None = None,
        dropout: float = 0.0,
        use_scale_shift_norm: bool = True,
        time_scale: float = 1.0,
    ) -> None:
        super().__init__()
        self.in_channels, self.input_size, self.num_classes = in_channels, input_size, num_classes
        self.model_channels, self.time_scale = model_channels, time_scale
        emb_dim = 4 * model_channels
        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
        )
        self.label_emb = None
        if num_classes > 0:
            self.label_emb = nn.Embedding(num_classes + int(class_dropout > 0), emb_dim)
        unet_levels(input_size, channel_mult, attention_resolutions)
        attn = set(attention_resolutions)

        def res(cin: int, cout: int) -> ResBlock:
            return ResBlock(cin, cout, emb_dim, dropout, use_scale_shift_norm)

        def attention(ch: int) -> AttentionBlock:
            return AttentionBlock(ch, num_heads, num_head_channels)

        ch = model_channels
        self.input_blocks = nn.ModuleList([_Seq([_Conv(in_channels, ch)])])
        skips, resolution = [ch], input_size
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [res(ch, model_channels * mult)]
                ch = model_channels * mult
                if resolution in attn:
                    layers.append(attention(ch))
                self.input_blocks.append(_Seq(layers))
                skips.append(ch)
            if level != len(channel_mult) - 1:
                self.input_blocks.append(_Seq([Downsample(ch)]))
                skips.append(ch)
                resolution //= 2
        self.middle_block = _Seq([res(ch, ch), attention(ch), res(ch, ch)])
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [res(ch + skips.pop(), model_channels * mult)]
                ch = model_channels * mult
                if resolution in attn:
                    layers.append(attention(ch))
                if level and i == num_res_blocks:
                    layers.append(Upsample(ch))
                    resolution *= 2
                self.output_blocks.append(_Seq(layers))
        self.out = nn.Sequential(
            _norm(ch), nn.SiLU(), _zero(nn.Conv2d(ch, in_channels, 3, padding=1))
        )
        rates = sorted((input_size // r for r in attn), reverse=True)
        log.info(
            f"ADM UNet (guided-diffusion, adm_guided): "
            f"{sum(p.numel() for p in self.parameters()) / 1e6:.2f}M parameters, attention at "
            f"latent resolutions {sorted(attn, reverse=True)} (guided-diffusion downsample rates "
            f"{rates}) + bottleneck, "
            + (
                f"{num_head_channels} channels per head"
                if num_head_channels
                else f"{num_heads} heads"
            )
        )

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x: (B, C, H, W), t: (B,) in [0, 1], y: (B,) int labels (index num_classes = null)."""
        emb = self.time_embed(timestep_embedding(t * self.time_scale, self.model_channels))
        if self.label_emb is not None:
            if y is None:
                y = torch.full((x.shape[0],), self.label_emb.num_embeddings - 1, device=x.device)
            emb = emb + self.label_emb(y)
        hs, h = [], x
        for block in self.input_blocks:
            h = block(h, emb)
            hs.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, hs.pop()], dim=1), emb)
        return self.out(h)


class _Conv(nn.Conv2d):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(cin, cout, 3, padding=1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        return super().forward(x)
