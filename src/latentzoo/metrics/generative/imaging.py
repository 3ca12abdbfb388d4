"""Pixel maths of the FID protocol (metrics.md §12): uint8 by rounding, the TF1 bilinear resize,
and pulling the image tensor out of whatever a data loader yields."""

from __future__ import annotations

from typing import Any

import torch

from latentzoo.utils.errors import LatentzooError

IMAGE_KEYS = ("image", "images")


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] floats -> uint8 by rounding (never truncation); uint8 passes through."""
    if images.dtype == torch.uint8:
        return images
    return images.detach().clamp(0, 1).mul(255).round().to(torch.uint8)


def resize_bilinear_tf1(images: torch.Tensor, size: int) -> torch.Tensor:
    """TF1 ``resize_bilinear(align_corners=False)``: source = dest · (in / out), no half-pixel
    offset, no antialias. This is the resize of the reference TF FID code (and of torch-fidelity,
    i.e. torchmetrics with ``antialias=False``); it is **not** ``F.interpolate``'s half-pixel
    bilinear. Input uint8 or float ``[N, C, H, W]``; output float32."""
    x = images.float()
    h, w = x.shape[-2:]
    if (h, w) == (size, size):
        return x

    def axis(n_in: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        src = torch.arange(size, dtype=torch.float32, device=x.device) * torch.tensor(
            n_in / size, dtype=torch.float32
        )
        lo = src.long()
        return lo, (lo + 1).clamp_max(n_in - 1), src - lo.float()

    y0, y1, dy = axis(h)
    x0, x1, dx = axis(w)
    top = x[..., y0, :]
    bottom = x[..., y1, :]
    top = top[..., x0] + (top[..., x1] - top[..., x0]) * dx
    bottom = bottom[..., x0] + (bottom[..., x1] - bottom[..., x0]) * dx
    return top + (bottom - top) * dy[:, None]


def batch_images(batch: Any) -> torch.Tensor:
    """The ``[N, C, H, W]`` images of a loader batch: a tensor, an ``(images, labels)`` tuple or
    a dict with an ``image``/``images`` key. A batch of latents (a cache's ``{"latent", ...}``)
    has no images to score, so it is refused with what to do instead."""
    if isinstance(batch, list | tuple):
        batch = batch[0]
    if isinstance(batch, dict):
        key = next((k for k in IMAGE_KEYS if k in batch), None)
        if key is None:
            raise LatentzooError(
                f"FID reference: the data yields {{{', '.join(map(str, batch))}}} batches without "
                "images (a latent cache?); set metrics.fid.reference_path (eval) or "
                "callbacks.fid.reference_path (training) to a mu/sigma .npz, or give the "
                "datamodule a reference_dataloader over its source images"
            )
        batch = batch[key]
    if not isinstance(batch, torch.Tensor) or batch.dim() != 4:
        raise LatentzooError(
            f"FID reference: expected [N, C, H, W] image batches, got {type(batch).__name__}"
            + (f" of shape {list(batch.shape)}" if isinstance(batch, torch.Tensor) else "")
        )
    return batch
