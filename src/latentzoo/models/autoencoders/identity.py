"""Identity first stage: pixel-space flow matching (mean = x, std = 0)."""

from __future__ import annotations

import torch

from latentzoo.models.autoencoders.base import FirstStage


class IdentityFirstStage(FirstStage):
    name = "identity"
    rebuilt_from_config = True  # no weights

    def __init__(self, channels: int = 3, scale_factor: float = 1.0) -> None:
        super().__init__()
        self.latent_channels = channels
        self.scale_factor = scale_factor
        self.downsample = 1

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x, torch.zeros_like(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z
