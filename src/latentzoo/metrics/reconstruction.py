"""Reconstruction quality of any model with ``reconstruct(x) -> images in [0, 1]``: per-pixel MSE
and PSNR (10·log10(1 / MSE) per image, averaged over images) on a split of the data."""

from __future__ import annotations

from typing import Any

import torch

from latentzoo.utils.logging import RankedLogger

log = RankedLogger(__name__)


class ReconstructionMetrics:
    """``metrics=reconstruction`` in eval.py: mse, psnr, sum_sq_error (per image)."""

    requires = ("reconstruct",)

    def __init__(self, split: str = "test", max_images: int | None = None) -> None:
        self.split, self.max_images = split, max_images

    @torch.no_grad()
    def __call__(self, model: Any, datamodule: Any) -> dict[str, float]:
        was_training = model.training
        model.eval()
        loader = getattr(datamodule, f"{self.split}_dataloader")()
        mse_all: list[torch.Tensor] = []
        seen = 0
        try:
            for batch in loader:
                x = (batch[0] if isinstance(batch, list | tuple) else batch).to(model.device)
                rec = model.reconstruct(x).float().clamp(0, 1)
                mse_all.append((rec - x.float()).pow(2).flatten(1).mean(1).cpu())
                seen += len(x)
                if self.max_images and seen >= self.max_images:
                    break
        finally:
            model.train(was_training)
        mse = torch.cat(mse_all)[: self.max_images]
        pixels = x[0].numel()
        log.info(f"reconstruction on {len(mse)} {self.split} images")
        return {
            "mse": float(mse.mean()),
            "psnr": float((10 * torch.log10(1 / mse.clamp_min(1e-10))).mean()),
            "sum_sq_error": float(mse.mean() * pixels),
            "num_images": float(len(mse)),
        }
