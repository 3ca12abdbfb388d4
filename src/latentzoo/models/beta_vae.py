"""β-VAE (Higgins et al., ICLR 2017): a VAE whose KL term is weighted by β.

    loss = E_q[-log p(x|z)] + β · KL(q(z|x) || N(0, I))

β = 1 is the plain VAE (Kingma & Welling 2014); β > 1 trades reconstruction for a more
factorised posterior. Reconstruction is Bernoulli (binary images such as dSprites, summed BCE
over pixels) or "gaussian", which follows disentanglement_lib's l2 loss: the summed squared
error between sigmoid(logits) and the image. Both are summed over pixels and averaged over the
batch, so β has the meaning it has in the papers.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from latentzoo.models.base import LatentModel, OptimizerFactory, SchedulerFactory, reparameterize


def gaussian_kl(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, I)) per sample and latent dimension."""
    return 0.5 * (mean.pow(2) + logvar.exp() - logvar - 1.0)


def reconstruction_loss(logits: torch.Tensor, x: torch.Tensor, likelihood: str) -> torch.Tensor:
    """Negative log-likelihood summed over pixels, one value per sample."""
    if likelihood == "bernoulli":
        nll = F.binary_cross_entropy_with_logits(logits, x, reduction="none")
    elif likelihood == "gaussian":
        nll = (torch.sigmoid(logits) - x).pow(2)
    else:
        raise ValueError(f"likelihood must be 'bernoulli' or 'gaussian', got '{likelihood}'")
    return nll.flatten(1).sum(1)


class GaussianVAEMixin:
    """The capabilities of a VAE whose ``encoder`` outputs (mean, log-variance) of a diagonal
    Gaussian posterior, whose prior is N(0, I) on ``latent_dim`` dimensions and whose
    ``decoder`` outputs image logits: ``encode`` (posterior mean, used by the disentanglement
    metrics), ``decode`` (images in [0, 1]), ``sample``, ``reconstruct``."""

    encoder: nn.Module
    decoder: nn.Module
    latent_dim: int
    device: torch.device

    def posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        return mean, logvar

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Deterministic representation: the posterior mean."""
        return self.posterior(x)[0]

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [0, 1]."""
        return torch.sigmoid(self.decoder(z))

    @torch.no_grad()
    def sample(self, n: int) -> torch.Tensor:
        """``n`` images from the prior, in [0, 1]."""
        return self.decode(torch.randn(n, self.latent_dim, device=self.device))

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))


class BetaVAE(GaussianVAEMixin, LatentModel):
    """β-VAE with a diagonal Gaussian posterior and a standard normal prior.

    Capabilities: ``encode`` (posterior mean, used by disentanglement metrics), ``decode``
    (images in [0, 1]), ``sample``, ``reconstruct``. Val/test losses decode the posterior mean
    μ, as the CLG-VAE code base (whose β-VAE baseline the paper comparisons use) does.
    """

    sample_in_eval = False

    def __init__(
        self,
        encoder: nn.Module,
        decoder: nn.Module,
        latent_dim: int = 10,
        beta: float = 1.0,
        likelihood: str = "bernoulli",
        optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
    ) -> None:
        super().__init__(optimizer=optimizer, scheduler=scheduler)
        if likelihood not in ("bernoulli", "gaussian"):
            raise ValueError(f"likelihood must be 'bernoulli' or 'gaussian', got '{likelihood}'")
        self.save_hyperparameters(
            logger=False, ignore=["encoder", "decoder", "optimizer", "scheduler"]
        )
        self.encoder = encoder  # image -> 2 * latent_dim (mean, log-variance)
        self.decoder = decoder  # latent -> image logits
        self.latent_dim = latent_dim
        self.beta = beta
        self.likelihood = likelihood

    def regulariser(self, mean: torch.Tensor, logvar: torch.Tensor, z: torch.Tensor) -> dict:
        """The weighted prior term; subclasses (β-TCVAE, FactorVAE) change this."""
        kl = gaussian_kl(mean, logvar).sum(1).mean()
        return {"kl": kl, "reg": self.beta * kl}

    def step(self, batch: Any, stage: str) -> dict[str, torch.Tensor]:
        x = batch[0] if isinstance(batch, list | tuple) else batch
        mean, logvar = self.posterior(x)
        z = reparameterize(mean, logvar, self.samples_z(stage))
        recon = reconstruction_loss(self.decoder(z), x, self.likelihood).mean()
        terms = self.regulariser(mean, logvar, z)
        reg = terms.pop("reg")
        return {"loss": recon + reg, "recon": recon, **terms}
