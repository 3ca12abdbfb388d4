"""The conv encoder/decoder pair of the disentanglement literature (dlib's ``conv_encoder``).

Four stride-2 convolutions (32-32-64-64, kernel 4) and a 256-unit dense layer, mirrored by the
decoder: the architecture of Higgins et al. 2017 / Locatello et al. 2019 for 64x64 images.
Other square sizes work by adding/removing stride-2 stages, ending at 4x4 features.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn


def _num_stages(size: int, channels: Sequence[int]) -> int:
    stages = int(math.log2(size // 4)) if size >= 4 else -1
    if size != 4 * 2**stages or stages < 1:
        raise ValueError(f"image size must be 4 * 2^k (8, 16, 32, 64, 128...), got {size}")
    return stages


class ConvEncoder(nn.Module):
    """Image (C, H, H) -> ``out_features`` (e.g. mean and log-variance of the posterior)."""

    def __init__(
        self,
        image_shape: Sequence[int],
        out_features: int,
        channels: Sequence[int] = (32, 32, 64, 64),
        hidden: int = 256,
    ) -> None:
        super().__init__()
        in_channels, height, width = image_shape
        if height != width:
            raise ValueError(f"ConvEncoder expects square images, got {height}x{width}")
        stages = _num_stages(height, channels)
        # Repeat the last width when the image needs more stages than channels were given.
        widths = [*channels, *[channels[-1]] * max(0, stages - len(channels))][:stages]
        layers: list[nn.Module] = []
        for width_out in widths:
            layers += [nn.Conv2d(in_channels, width_out, 4, stride=2, padding=1), nn.ReLU()]
            in_channels = width_out
        self.features = nn.Sequential(*layers, nn.Flatten())
        self.head = nn.Sequential(
            nn.Linear(in_channels * 16, hidden), nn.ReLU(), nn.Linear(hidden, out_features)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class ConvDecoder(nn.Module):
    """Latent ``in_features`` -> image logits (C, H, H); the mirror of :class:`ConvEncoder`."""

    def __init__(
        self,
        image_shape: Sequence[int],
        in_features: int,
        channels: Sequence[int] = (32, 32, 64, 64),
        hidden: int = 256,
    ) -> None:
        super().__init__()
        out_channels, height, _ = image_shape
        stages = _num_stages(height, channels)
        widths = [*channels, *[channels[-1]] * max(0, stages - len(channels))][:stages]
        widths = widths[::-1]  # 64-64-32-32: widest features first
        self.start_channels = widths[0]
        self.head = nn.Sequential(
            nn.Linear(in_features, hidden),
            nn.ReLU(),
            nn.Linear(hidden, widths[0] * 16),
            nn.ReLU(),
        )
        layers: list[nn.Module] = []
        for width_in, width_out in zip(widths, [*widths[1:], out_channels], strict=True):
            layers += [nn.ConvTranspose2d(width_in, width_out, 4, stride=2, padding=1), nn.ReLU()]
        self.features = nn.Sequential(*layers[:-1])  # no activation on the logits

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.head(z).view(z.shape[0], self.start_channels, 4, 4)
        return self.features(h)
