"""Keypoint overlays for particle models (DLP): every ``every_n_steps`` training steps and at the
end, a grid of validation images (top), their reconstructions (middle) and the posterior
keypoints drawn over the images (bottom), coloured by confidence (blue = least confident of the
image, red = most). Needs ``keypoints(x) -> (mu [B, K, 2] (row, col) in [-1, 1], confidence
[B, K])`` and ``reconstruct(x)``."""

from __future__ import annotations

import lightning as L
import torch
from torchvision.utils import make_grid

from latentzoo.callbacks.images import _GridCallback


def draw_keypoints(
    images: torch.Tensor, mu: torch.Tensor, confidence: torch.Tensor, radius: int = 1
) -> torch.Tensor:
    """Paint (2·radius+1)² squares at ``mu`` on copies of ``images`` [B, 3, H, W]."""
    out = images.detach().float().clone()
    if out.shape[1] == 1:
        out = out.expand(-1, 3, -1, -1).clone()
    b, _, h, w = out.shape
    low, high = confidence.min(1, keepdim=True).values, confidence.max(1, keepdim=True).values
    t = ((confidence - low) / (high - low).clamp_min(1e-8)).clamp(0, 1)  # [B, K]
    colours = torch.stack([t, 0.2 * torch.ones_like(t), 1 - t], -1)  # blue -> red
    rows = ((mu[..., 0] + 1) / 2 * (h - 1)).round().long()
    cols = ((mu[..., 1] + 1) / 2 * (w - 1)).round().long()
    for dr in range(-radius, radius + 1):
        for dc in range(-radius, radius + 1):
            r, c = (rows + dr).clamp(0, h - 1), (cols + dc).clamp(0, w - 1)
            for i in range(b):
                out[i, :, r[i], c[i]] = colours[i].T.to(out)
    return out


class KeypointOverlay(_GridCallback):
    """Images / reconstructions / keypoints coloured by confidence; ``keypoints_step<N>.png``."""

    name = "keypoints"
    required = ("keypoints", "reconstruct")

    def draw(self, model: L.LightningModule, images: torch.Tensor) -> torch.Tensor:
        mu, confidence = model.keypoints(images)
        recon = model.reconstruct(images).float().clamp(0, 1)
        overlay = draw_keypoints(images, mu, confidence)
        rows = torch.cat([images.float().expand_as(overlay), recon.expand_as(overlay), overlay])
        return make_grid(rows, nrow=len(images), pad_value=0.5)
