"""KL autoencoder: the first stage of latent diffusion / latent flow matching, trained here.

Rombach et al., "High-Resolution Image Synthesis with Latent Diffusion Models", CVPR 2022 (§3,
App. G): a conv autoencoder with a diagonal Gaussian posterior and a very small KL weight, so
latents stay close to N(0, I) in scale while reconstructions stay sharp:

    loss = Σ_pixels |x − x̂| + perceptual_weight · LPIPS(x, x̂) · #pixels
           + kl_weight · KL(q(z|x) || N(0, I))

averaged over the batch (images mapped to [-1, 1]). LPIPS is optional (``perceptual_weight > 0``
needs the ``lpips`` package and its weights); the adversarial term of LDM is not included.
Capabilities: ``encode`` (posterior mean), ``decode``, ``reconstruct``.
"""

from __future__ import annotations

from typing import Any

import torch

from latentzoo.models.autoencoders.kl import KLAutoencoderNet, kl_loss, l1
from latentzoo.models.base import LatentModel, OptimizerFactory, SchedulerFactory
from latentzoo.utils.errors import LatentzooError


def _load_lpips() -> torch.nn.Module:
    try:
        import lpips
    except ImportError as error:
        raise LatentzooError(
            "model.perceptual_weight > 0 needs the lpips package (pip install lpips) and its VGG "
            "weights (downloaded by torchvision on first use); set model.perceptual_weight=0 to "
            "train without the perceptual loss"
        ) from error
    try:
        return lpips.LPIPS(net="vgg", verbose=False)
    except Exception as error:  # offline torchvision download
        raise LatentzooError(
            f"could not load LPIPS VGG weights ({error}); put vgg16 weights in the torch hub "
            "cache (~/.cache/torch/hub/checkpoints) or set model.perceptual_weight=0"
        ) from error


class KLAutoencoder(LatentModel):
    def __init__(
        self,
        net: KLAutoencoderNet,
        kl_weight: float = 1e-6,
        perceptual_weight: float = 0.0,
        optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
    ) -> None:
        super().__init__(optimizer=optimizer, scheduler=scheduler)
        self.save_hyperparameters(logger=False, ignore=["net", "optimizer", "scheduler"])
        self.net = net
        self.kl_weight, self.perceptual_weight = kl_weight, perceptual_weight
        self.lpips = _load_lpips().eval().requires_grad_(False) if perceptual_weight > 0 else None

    def state_dict(self, *args, **kwargs) -> dict[str, Any]:
        state = super().state_dict(*args, **kwargs)  # LPIPS weights are not ours to save
        return {k: v for k, v in state.items() if not k.startswith("lpips.")}

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        if self.lpips is not None:
            state_dict = {
                **state_dict,
                **{f"lpips.{k}": v for k, v in self.lpips.state_dict().items()},
            }
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] -> posterior mean."""
        return self.net.encode(x * 2 - 1)[0]

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return ((self.net.decode(z) + 1) / 2).clamp(0, 1)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    def step(self, batch: Any, stage: str) -> dict[str, torch.Tensor]:
        x = batch[0] if isinstance(batch, list | tuple) else batch
        x = x * 2 - 1
        recon, mean, std = self.net(x)
        rec = l1(recon, x).mean()
        kl = kl_loss(mean, std).mean()
        loss = rec + self.kl_weight * kl
        terms = {"rec": rec, "kl": kl}
        if self.lpips is not None:
            p = self.lpips(recon.clamp(-1, 1), x).mean() * x[0].numel()
            loss = loss + self.perceptual_weight * p
            terms["lpips"] = p / x[0].numel()
        terms["mse"] = (recon.detach() - x).pow(2).mean()
        return {"loss": loss, **terms}
