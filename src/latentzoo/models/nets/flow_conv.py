"""Conv encoder/decoder for any square size (28, 64, 128 px), used by the latent-flow model.

Stride-2 convolutions (kernel 4, padding 1) halve the size with floor (28 -> 14 -> 7 -> 3); the
decoder mirrors them with transposed convolutions whose ``output_padding`` restores the exact
sizes. ``channels=None`` picks the latent-flow defaults per resolution (spec latent_flow.md §3):
28 px 32-64-128, 64 px 32-32-64-64 + FC 256 (dlib), 128 px 32-64-128-256-256 + FC 512.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

_DEFAULTS: dict[int, tuple[tuple[int, ...], int]] = {
    28: ((32, 64, 128), 256),
    32: ((32, 64, 128), 256),
    64: ((32, 32, 64, 64), 256),
    128: ((32, 64, 128, 256, 256), 512),
}


def _resolve(
    size: int, channels: Sequence[int] | None, hidden: int | None
) -> tuple[list[int], int, list[int]]:
    if channels is None or hidden is None:
        if size not in _DEFAULTS:
            raise ValueError(
                f"no default conv widths for {size} px (have {sorted(_DEFAULTS)}); "
                "set channels and hidden explicitly"
            )
        default_channels, default_hidden = _DEFAULTS[size]
        channels = default_channels if channels is None else channels
        hidden = default_hidden if hidden is None else hidden
    sizes = [size]
    for _ in channels:
        sizes.append((sizes[-1] - 2) // 2 + 1)  # conv k4 s2 p1
    if sizes[-1] < 1:
        raise ValueError(f"{len(channels)} stride-2 stages are too many for {size} px")
    return list(channels), int(hidden), sizes


class FlowConvEncoder(nn.Module):
    """Image (C, H, H) -> ``out_features``: stride-2 convs, ReLU, then FC ``hidden`` -> out."""

    def __init__(
        self,
        image_shape: Sequence[int],
        out_features: int,
        channels: Sequence[int] | None = None,
        hidden: int | None = None,
    ) -> None:
        super().__init__()
        in_channels, height, width = image_shape
        if height != width:
            raise ValueError(f"FlowConvEncoder expects square images, got {height}x{width}")
        channels, hidden, sizes = _resolve(height, channels, hidden)
        layers: list[nn.Module] = []
        for width_out in channels:
            layers += [nn.Conv2d(in_channels, width_out, 4, stride=2, padding=1), nn.ReLU()]
            in_channels = width_out
        self.features = nn.Sequential(*layers, nn.Flatten())
        flat = in_channels * sizes[-1] ** 2
        self.head = nn.Sequential(
            nn.Linear(flat, hidden), nn.ReLU(), nn.Linear(hidden, out_features)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class FlowConvDecoder(nn.Module):
    """Latent -> image logits (C, H, H); the mirror of :class:`FlowConvEncoder`."""

    def __init__(
        self,
        image_shape: Sequence[int],
        in_features: int,
        channels: Sequence[int] | None = None,
        hidden: int | None = None,
    ) -> None:
        super().__init__()
        out_channels, height, _ = image_shape
        channels, hidden, sizes = _resolve(height, channels, hidden)
        widths = channels[::-1]
        self.start = (widths[0], sizes[-1])
        self.head = nn.Sequential(
            nn.Linear(in_features, hidden),
            nn.ReLU(),
            nn.Linear(hidden, widths[0] * sizes[-1] ** 2),
            nn.ReLU(),
        )
        layers: list[nn.Module] = []
        targets = sizes[::-1][1:]  # e.g. 3 -> 7 -> 14 -> 28
        for i, (w_in, w_out) in enumerate(zip(widths, [*widths[1:], out_channels], strict=True)):
            pad = targets[i] - 2 * sizes[::-1][i]  # 0 or 1: undo the floor of the encoder
            layers += [
                nn.ConvTranspose2d(w_in, w_out, 4, stride=2, padding=1, output_padding=pad),
                nn.ReLU(),
            ]
        self.features = nn.Sequential(*layers[:-1])  # logits: no final activation

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        channels, size = self.start
        return self.features(self.head(z).view(z.shape[0], channels, size, size))
