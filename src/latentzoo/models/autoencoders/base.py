"""Common interface of the frozen first stages used by latent generative models.

    encode(x in [-1, 1]) -> (mean, std) of the posterior, unscaled
    decode(z, unscaled) -> x in [-1, 1] (not clamped)
    scale_factor, latent_channels, downsample

The latent model multiplies posterior samples by ``scale_factor`` before flow matching and
divides before decoding. ``fingerprint()`` identifies the weights (the latent cache refuses a
cache written by another first stage). ``rebuilt_from_config`` is true when the config alone
restores the weights (a pretrained file, or no weights): latent models then leave the first stage
out of their checkpoints and check its fingerprint on load instead.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class FirstStage(nn.Module):
    """Frozen autoencoder: always in eval mode, no gradients."""

    name: str = "first_stage"
    scale_factor: float = 1.0
    latent_channels: int
    downsample: int = 1
    rebuilt_from_config: bool = False  # randomly initialised stages are stored in checkpoints

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def freeze(self) -> FirstStage:
        self.eval()
        self.requires_grad_(False)
        return self

    def train(self, mode: bool = True) -> FirstStage:
        return super().train(False)  # frozen: BatchNorm/dropout never in train mode

    def latent_shape(self, image_shape: list[int] | tuple[int, ...]) -> list[int]:
        _, h, w = image_shape
        if h % self.downsample or w % self.downsample:
            raise ValueError(f"image size {h}x{w} is not divisible by downsample {self.downsample}")
        return [self.latent_channels, h // self.downsample, w // self.downsample]

    @torch.no_grad()
    def fingerprint(self) -> float:
        """A number that changes with the weights: sum of |θ| in float64 (0 if parameter-free)."""
        return float(
            sum(
                p.detach().double().abs().sum()
                for p in self.state_dict().values()
                if p.is_floating_point()
            )
        )

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "class": type(self).__name__,
            "scale_factor": float(self.scale_factor),
            "latent_channels": int(self.latent_channels),
            "downsample": int(self.downsample),
            "fingerprint": self.fingerprint(),
        }
