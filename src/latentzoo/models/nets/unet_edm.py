"""LFM's ``adm`` backbone: the ADM UNet as re-implemented in EDM (``DhariwalUNet``).

Karras et al., "Elucidating the Design Space of Diffusion-Based Generative Models" (NeurIPS
2022), reference code NVlabs/edm ``training/networks.py``; Latent Flow Matching (Dao et al.
2023) uses it for FFHQ, LSUN bedroom/church, ImageNet and CelebA-1024 (spec §4). It differs from
the guided-diffusion layout (``unet_adm.py``, LFM's ``adm_guided``):

- every level after the first starts with a res-block that **down-samples inside the block**
  (2×2 average pool before its first conv and on its skip path); the decoder's levels start with
  an **up-sampling res-block** (nearest ×2 in the same places);
- **attention sits inside the res-block** (after the residual sum), with 64 channels per head,
  at the chosen latent resolutions; the bottleneck's first block always has attention;
- the noise embedding is the positional (sin/cos, [cos, sin]) embedding of the raw t, mapped by
  Linear → SiLU → Linear to ``channel_mult_emb × model_channels``; class labels enter through a
  bias-free Linear on their one-hot vector, so the null label (index ``num_classes``) is the
  zero vector (EDM's label dropout); after the sum, SiLU;
- EDM's init: PyTorch's default uniform init (EDM's kaiming-uniform with weight √(1/3)) for
  convs and linears, N(0, 1) for the label map, and **zero** for the last conv of every block,
  the attention output projection and the output conv — so the net outputs exactly 0 at init.

Module and parameter names follow EDM's (``map_layer0``, ``enc["16x16_down"].conv0``, ...), so
an EDM/LFM state dict loads after dropping its fixed resampling filters (``import_lfm``).
``attention_resolutions`` are latent spatial resolutions (e.g. 16, 8, 4 for a 32×32 latent).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from latentzoo.models.nets.dit import timestep_embedding
from latentzoo.models.nets.unet_adm import unet_levels
from latentzoo.utils.errors import LatentzooError

log = logging.getLogger(__name__)


def _group_norm(channels: int) -> nn.GroupNorm:
    """EDM's GroupNorm: 32 groups, but at least 4 channels per group."""
    return nn.GroupNorm(min(32, channels // 4), channels, eps=1e-5)


def _zero_init(module: nn.Module) -> nn.Module:
    for param in module.parameters():
        nn.init.zeros_(param)
    return module


def _resample(x: torch.Tensor, mode: str | None) -> torch.Tensor:
    """EDM's [1, 1] resampling filter: a 2×2 average pool down, nearest-neighbour ×2 up."""
    if mode == "down":
        return F.avg_pool2d(x, 2)
    if mode == "up":
        return F.interpolate(x, scale_factor=2, mode="nearest")
    return x


class UNetBlock(nn.Module):
    """Res-block with optional up/down-sampling and self-attention (EDM's ``UNetBlock``).

    h = conv0(resample(SiLU(GN(x)))); h = SiLU(GN(h)·(1 + scale) + shift) with (scale, shift)
    from the embedding; x' = conv1(dropout(h)) + skip(resample(x)); then, with attention,
    x' += proj(attention(qkv(GN(x')))).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_channels: int,
        resample: str | None = None,
        attention: bool = False,
        head_channels: int = 64,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.in_channels, self.out_channels, self.resample = in_channels, out_channels, resample
        self.norm0 = _group_norm(in_channels)
        self.conv0 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.affine = nn.Linear(emb_channels, 2 * out_channels)
        self.norm1 = _group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv1 = _zero_init(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        # a 1x1 projection only where the width changes; pure resampling is parameter-free
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None
        self.num_heads = out_channels // head_channels if attention else 0
        if attention:
            if out_channels % head_channels:
                raise LatentzooError(
                    f"attention over {out_channels} channels needs a multiple of "
                    f"num_head_channels={head_channels}; change model_channels or channel_mult"
                )
            self.norm2 = _group_norm(out_channels)
            self.qkv = nn.Conv2d(out_channels, 3 * out_channels, 1)
            self.proj = _zero_init(nn.Conv2d(out_channels, out_channels, 1))

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv0(_resample(F.silu(self.norm0(x)), self.resample))
        scale, shift = self.affine(emb).to(h.dtype)[:, :, None, None].chunk(2, dim=1)
        h = F.silu(torch.addcmul(shift, self.norm1(h), scale + 1))
        skip = _resample(x, self.resample)
        x = self.conv1(self.dropout(h)) + (self.skip(skip) if self.skip is not None else skip)
        if self.num_heads:
            height, width = x.shape[-2:]
            # EDM's qkv channel layout: (head, channel within head, q/k/v)
            q, k, v = rearrange(
                self.qkv(self.norm2(x)),
                "b (h d three) x y -> three b h (x y) d",
                three=3,
                h=self.num_heads,
            )
            a = F.scaled_dot_product_attention(q, k, v)
            x = x + self.proj(rearrange(a, "b h (x y) d -> b (h d) x y", x=height, y=width))
        return x


class DhariwalUNet(nn.Module):
    """EDM's ADM UNet as a velocity net ``v(x, t, y)`` (LFM's ``adm`` backbone).

    Args:
        in_channels: latent channels (output has the same).
        input_size: latent height/width; ``attention_resolutions`` refer to it.
        num_classes: label count (one-hot width); 0 = unconditional.
        class_dropout: unused by the layers: the null label is always the zero one-hot vector.
        model_channels: width of the first level; level i has ``model_channels·channel_mult[i]``.
        channel_mult: per-level width multipliers (LFM at 256 px: 1, 2, 3, 4).
        channel_mult_emb: embedding width = ``channel_mult_emb·model_channels``.
        num_res_blocks: res-blocks per encoder level (the decoder has one more per level).
        attention_resolutions: latent resolutions whose blocks have attention (plus the
            bottleneck's first block).
        num_head_channels: channels per attention head.
        dropout: dropout before the last conv of every block.
        time_scale: multiplier on t before the positional embedding (LFM feeds the raw t).
    """

    def __init__(
        self,
        in_channels: int = 4,
        input_size: int = 32,
        num_classes: int = 0,
        class_dropout: float = 0.0,
        model_channels: int = 256,
        channel_mult: tuple[int, ...] | list[int] = (1, 2, 3, 4),
        channel_mult_emb: int = 4,
        num_res_blocks: int = 2,
        attention_resolutions: tuple[int, ...] | list[int] = (16, 8, 4),
        num_head_channels: int = 64,
        dropout: float = 0.0,
        time_scale: float = 1.0,
    ) -> None:
        super().__init__()
        self.in_channels, self.input_size, self.num_classes = in_channels, input_size, num_classes
        self.model_channels, self.time_scale = model_channels, time_scale
        levels = unet_levels(input_size, channel_mult, attention_resolutions)
        attention = set(attention_resolutions)
        emb = model_channels * channel_mult_emb
        self.map_layer0 = nn.Linear(model_channels, emb)
        self.map_layer1 = nn.Linear(emb, emb)
        self.map_label = None
        if num_classes > 0:
            self.map_label = nn.Linear(num_classes, emb, bias=False)
            nn.init.normal_(self.map_label.weight)  # EDM: kaiming-normal × √label_dim = N(0, 1)

        def block(cin: int, cout: int, **kwargs) -> UNetBlock:
            return UNetBlock(
                cin, cout, emb, head_channels=num_head_channels, dropout=dropout, **kwargs
            )

        self.enc = nn.ModuleDict()
        cout = in_channels
        for level, mult in enumerate(channel_mult):
            res = levels[level]
            if level == 0:
                self.enc[f"{res}x{res}_conv"] = nn.Conv2d(cout, model_channels * mult, 3, padding=1)
                cout = model_channels * mult
            else:
                self.enc[f"{res}x{res}_down"] = block(cout, cout, resample="down")
            for idx in range(num_res_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_block{idx}"] = block(cin, cout, attention=res in attention)
        skips = [m.out_channels for m in self.enc.values()]
        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = levels[level]
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = block(cout, cout, attention=True)
                self.dec[f"{res}x{res}_in1"] = block(cout, cout)
            else:
                self.dec[f"{res}x{res}_up"] = block(cout, cout, resample="up")
            for idx in range(num_res_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                self.dec[f"{res}x{res}_block{idx}"] = block(cin, cout, attention=res in attention)
        self.out_norm = _group_norm(cout)
        self.out_conv = _zero_init(nn.Conv2d(cout, in_channels, 3, padding=1))
        log.info(
            f"DhariwalUNet (EDM adm): {sum(p.numel() for p in self.parameters()) / 1e6:.2f}M "
            f"parameters, levels {levels}, attention at {sorted(attention, reverse=True)} "
            f"+ bottleneck, {num_head_channels} channels per head"
        )

    def embedding(self, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        """SiLU(map_layer1(SiLU(map_layer0(pos(t)))) + map_label(one_hot(y)))."""
        emb = timestep_embedding(t * self.time_scale, self.model_channels)
        emb = self.map_layer1(F.silu(self.map_layer0(emb.to(self.map_layer0.weight.dtype))))
        if self.map_label is not None and y is not None:
            # index num_classes (the null label) becomes the zero vector
            one_hot = F.one_hot(y.long(), self.num_classes + 1)[:, : self.num_classes]
            emb = emb + self.map_label(one_hot.to(emb.dtype))
        return F.silu(emb)

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x: (B, C, H, W), t: (B,) or scalar in [0, 1], y: (B,) int labels or None (= null)."""
        emb = self.embedding(t.reshape(-1).expand(x.shape[0]), y)
        skips = []
        for module in self.enc.values():
            x = module(x, emb) if isinstance(module, UNetBlock) else module(x)
            skips.append(x)
        for name, module in self.dec.items():
            if "_block" in name:  # every decoder res-block takes the matching encoder output
                x = torch.cat([x, skips.pop()], dim=1)
            x = module(x, emb)
        return self.out_conv(F.silu(self.out_norm(x)))
