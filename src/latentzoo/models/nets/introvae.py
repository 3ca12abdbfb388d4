"""The residual encoder/decoder of IntroVAE (Huang et al., NeurIPS 2018) as used by Soft-IntroVAE
(Daniel & Tamar, CVPR 2021; spec ``soft_intro_vae.md`` §3).

Every stage halves (encoder) or doubles (decoder) the resolution, one stage per entry of
``channels``, so an H×W image meets a ``channels[-1]`` × H/2^n × W/2^n feature map
(n = len(channels)). The decoder has no output activation: images live in [0, 1] and samples are
clamped by the model.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class ResidualBlock(nn.Module):
    """conv3×3 → BN → LeakyReLU(0.2) → conv3×3 → BN, plus a skip (1×1 conv when the width
    changes), then LeakyReLU(0.2). Convs have no bias: BatchNorm follows each of them."""

    def __init__(self, in_channels: int, out_channels: int, slope: float = 0.2) -> None:
        super().__init__()
        self.skip: nn.Module = (
            nn.Conv2d(in_channels, out_channels, 1, bias=False)
            if in_channels != out_channels
            else nn.Identity()
        )
        self.main = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.LeakyReLU(slope),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
        )
        self.act = nn.LeakyReLU(slope)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.main(x) + self.skip(x))


def feature_shape(
    image_shape: Sequence[int], channels: Sequence[int], feature_size: int | None
) -> tuple[int, int, int]:
    """(channels[-1], H / 2^n, W / 2^n) after n = len(channels) poolings; checks the sizes."""
    _, height, width = (int(s) for s in image_shape)
    factor = 2 ** len(channels)
    if height % factor or width % factor:
        raise ValueError(
            f"image {height}x{width} is not divisible by 2^{len(channels)} = {factor} "
            f"(one pooling per entry of channels={list(channels)})"
        )
    size = height // factor
    if feature_size is not None and size != feature_size:
        raise ValueError(
            f"channels={list(channels)} pools a {height}-px image to {size}x{size}, but "
            f"feature_size={feature_size}: use {len(channels)} channels for this image size "
            "or set feature_size to match"
        )
    return int(channels[-1]), size, width // factor


class IntroEncoder(nn.Module):
    """Image → 2·latent_dim (μ, log σ²): Conv5×5 + BN + LeakyReLU + AvgPool, then one
    [ResBlock + AvgPool] per further channel, a final ResBlock, flatten, Linear."""

    def __init__(
        self,
        image_shape: Sequence[int],
        channels: Sequence[int],
        latent_dim: int,
        feature_size: int | None = None,
    ) -> None:
        super().__init__()
        self.feature_shape = feature_shape(image_shape, channels, feature_size)
        layers: list[nn.Module] = [
            nn.Conv2d(int(image_shape[0]), channels[0], 5, padding=2, bias=False),
            nn.BatchNorm2d(channels[0]),
            nn.LeakyReLU(0.2),
            nn.AvgPool2d(2),
        ]
        previous = channels[0]
        for width in channels[1:]:
            layers += [ResidualBlock(previous, width), nn.AvgPool2d(2)]
            previous = width
        layers.append(ResidualBlock(previous, previous))
        self.features = nn.Sequential(*layers)
        c, h, w = self.feature_shape
        self.fc = nn.Linear(c * h * w, 2 * latent_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).flatten(1))


class IntroDecoder(nn.Module):
    """latent → image: Linear + ReLU to the encoder's feature map, one [ResBlock + nearest
    Upsample×2] per channel (reversed), a final ResBlock and Conv5×5 → image channels.
    No output activation."""

    def __init__(
        self,
        image_shape: Sequence[int],
        channels: Sequence[int],
        latent_dim: int,
        feature_size: int | None = None,
    ) -> None:
        super().__init__()
        self.feature_shape = feature_shape(image_shape, channels, feature_size)
        c, h, w = self.feature_shape
        self.fc = nn.Sequential(nn.Linear(latent_dim, c * h * w), nn.ReLU())
        layers: list[nn.Module] = []
        previous = c
        for width in reversed(channels):
            layers += [ResidualBlock(previous, width), nn.Upsample(scale_factor=2, mode="nearest")]
            previous = width
        layers += [
            ResidualBlock(previous, previous),
            nn.Conv2d(previous, int(image_shape[0]), 5, padding=2),
        ]
        self.main = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.main(self.fc(z).view(-1, *self.feature_shape))
