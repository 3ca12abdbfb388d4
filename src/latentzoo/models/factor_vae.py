"""FactorVAE (Kim & Mnih, "Disentangling by Factorising", ICML 2018, arXiv:1802.05983).

A VAE whose loss adds γ·TC(z), the total correlation of the aggregate posterior, estimated by
the density-ratio trick: a discriminator D learns to tell samples of q(z) from samples of
q̄(z) = Π_j q(z_j), obtained by permuting every latent dimension independently across the batch.
With class 0 = "from q(z)" and class 1 = "permuted",

    TC(z) ≈ E_q(z)[log D_0(z) − log D_1(z)] = E_q(z)[logit_0(z) − logit_1(z)]     (eq. 4)

The VAE (encoder + decoder) and the discriminator have their own optimizers; the discriminator
maximises the log-likelihood of the right class (cross-entropy).

Which samples train the discriminator (``discriminator_batch``):

- ``same`` (default, disentanglement_lib's ``FactorVAE``): the latents of the VAE's own batch and
  their permutation, from the same forward pass; both updates use the parameters before either
  step, i.e. dlib's simultaneous update.
- ``split`` (the paper's Algorithm 2): the batch is cut in two halves; the VAE trains on the
  first, and the discriminator sees the first half's latents against the permuted latents of
  the second (so z and its permutation come from independent samples). Double
  ``data.batch_size`` to keep the VAE batch.

Lightning runs this with manual optimization; ``global_step`` counts VAE updates only (the
discriminator step does not advance it), so ``trainer.max_steps`` means VAE steps.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from latentzoo.models.base import OptimizerFactory, SchedulerFactory, reparameterize
from latentzoo.models.beta_vae import BetaVAE, gaussian_kl, reconstruction_loss


class Discriminator(nn.Module):
    """MLP latent -> 2 logits: ``num_layers`` × [Linear(hidden) + LeakyReLU(0.2)], then Linear 2.

    Kim & Mnih (Appendix) and dlib's ``fc_discriminator``: 6 layers of 1000 units.
    """

    def __init__(
        self, latent_dim: int, hidden: int = 1000, num_layers: int = 6, slope: float = 0.2
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = latent_dim
        for _ in range(num_layers):
            layers += [nn.Linear(width, hidden), nn.LeakyReLU(slope)]
            width = hidden
        self.net = nn.Sequential(*layers, nn.Linear(width, 2))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


def permute_dims(z: torch.Tensor) -> torch.Tensor:
    """Samples of Π_j q(z_j): each latent dimension shuffled independently across the batch."""
    batch, dims = z.shape
    order = torch.rand(batch, dims, device=z.device).argsort(dim=0)
    return z.gather(0, order)


class FactorVAE(BetaVAE):
    """FactorVAE: VAE loss (β = 1 on the KL) + γ·TC, TC from a discriminator on permuted latents.

    Capabilities: ``encode`` (posterior mean), ``decode``, ``sample``, ``reconstruct``.
    """

    # The discriminator's backward never reaches the encoder/decoder (its input is detached):
    # under DDP those parameters are unused in that backward, and DDP must know.
    ddp_find_unused_parameters = True

    def __init__(
        self,
        encoder: nn.Module,
        decoder: nn.Module,
        discriminator: nn.Module,
        latent_dim: int = 10,
        gamma: float = 40.0,
        beta: float = 1.0,
        likelihood: str = "bernoulli",
        discriminator_batch: str = "same",
        optimizer: OptimizerFactory | None = None,
        discriminator_optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
    ) -> None:
        with warnings.catch_warnings():  # BetaVAE's hparams call sees the discriminator too;
            warnings.filterwarnings("ignore", "Attribute 'discriminator'")  # ignored below
            super().__init__(
                encoder=encoder,
                decoder=decoder,
                latent_dim=latent_dim,
                beta=beta,
                likelihood=likelihood,
                optimizer=optimizer,
                scheduler=scheduler,
            )
        if discriminator_batch not in ("same", "split"):
            raise ValueError(
                f"discriminator_batch must be 'same' or 'split', got '{discriminator_batch}'"
            )
        self.save_hyperparameters(
            logger=False,
            ignore=[
                "encoder",
                "decoder",
                "discriminator",
                "optimizer",
                "discriminator_optimizer",
                "scheduler",
            ],
        )
        self.discriminator = discriminator
        self.gamma = gamma
        self.discriminator_batch = discriminator_batch
        self.discriminator_optimizer_factory = discriminator_optimizer or torch.optim.Adam
        self.automatic_optimization = False  # two optimizers, stepped in training_step

    # --- losses -------------------------------------------------------------------------------
    def vae_terms(
        self, x: torch.Tensor, stage: str = "train"
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The VAE loss terms on ``x`` and the latents (samples in training; μ in val/test,
        as :class:`BetaVAE`) that the discriminator sees."""
        mean, logvar = self.posterior(x)
        z = reparameterize(mean, logvar, self.samples_z(stage))
        recon = reconstruction_loss(self.decoder(z), x, self.likelihood).mean()
        kl = gaussian_kl(mean, logvar).sum(1).mean()
        logits = self.discriminator(z)
        tc = (logits[:, 0] - logits[:, 1]).mean()
        loss = recon + self.beta * kl + self.gamma * tc
        return {"loss": loss, "recon": recon, "kl": kl, "tc": tc}, z

    def discriminator_terms(
        self, z_real: torch.Tensor, z_other: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Cross-entropy of D on latents of q(z) (class 0) and permuted ``z_other`` (class 1)."""
        z_perm = permute_dims(z_other)
        logits = self.discriminator(torch.cat([z_real, z_perm]))
        labels = torch.cat([z_real.new_zeros(len(z_real)), z_real.new_ones(len(z_perm))]).long()
        loss = F.cross_entropy(logits, labels)
        accuracy = (logits.argmax(1) == labels).float().mean()
        return {"d_loss": loss, "d_accuracy": accuracy}

    def split_batch(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(VAE images, images whose permuted latents the discriminator sees, or None)."""
        if self.discriminator_batch == "same":
            return x, None
        if len(x) < 4:
            raise ValueError("discriminator_batch='split' needs a batch of at least 4 images")
        half = len(x) // 2
        return x[:half], x[half:]

    def discriminator_inputs(
        self, z: torch.Tensor, x_other: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        z_real = z.detach()
        if x_other is None:
            return z_real, z_real
        with torch.no_grad():
            mean, logvar = self.posterior(x_other)
            z_other = reparameterize(mean, logvar)
        n = min(len(z_real), len(z_other))
        return z_real[:n], z_other[:n]

    def step(self, batch: Any, stage: str) -> dict[str, torch.Tensor]:
        """Validation/test: the VAE terms and the discriminator's loss on the same batch."""
        x = batch[0] if isinstance(batch, list | tuple) else batch
        terms, z = self.vae_terms(x, stage)
        return {**terms, **self.discriminator_terms(z, z)}

    # --- optimisation -------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        vae_params = [*self.encoder.parameters(), *self.decoder.parameters()]
        vae_opt = self.make_optimizer(self.optimizer_factory, vae_params)
        disc_opt = self.make_optimizer(
            self.discriminator_optimizer_factory, self.discriminator.parameters()
        )
        if self.scheduler_factory is None:
            return [vae_opt, disc_opt]
        return [vae_opt, disc_opt], [self.scheduler_factory(optimizer=vae_opt)]

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        vae_opt, disc_opt = self.optimizers()
        x = batch[0] if isinstance(batch, list | tuple) else batch
        x_vae, x_other = self.split_batch(x)

        terms, z = self.vae_terms(x_vae)
        loss = terms["loss"]
        vae_opt.zero_grad()
        self.manual_backward(loss)
        vae_opt.step()

        d_terms = self.discriminator_terms(*self.discriminator_inputs(z, x_other))
        disc_opt.zero_grad()
        self.manual_backward(d_terms["d_loss"])
        # Through the strategy (precision plugin, hooks) but not the LightningOptimizer wrapper,
        # so that global_step counts one step per batch, not two.
        self.trainer.strategy.optimizer_step(disc_opt.optimizer, closure=lambda: None)

        scheduler = self.lr_schedulers()
        if scheduler is not None and self.scheduler_interval == "step":
            scheduler.step()
        self.log_terms({**terms, **d_terms}, "train", len(x_vae))
        return loss

    def on_train_epoch_end(self) -> None:
        scheduler = self.lr_schedulers()
        if scheduler is not None and self.scheduler_interval == "epoch":
            scheduler.step()
