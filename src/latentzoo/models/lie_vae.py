"""Commutative Lie Group VAE (Zhu, Xu, Tao, "Commutative Lie Group VAE for Disentanglement
Learning", ICML 2021, arXiv:2106.03375).

The decoder reads the latent code as Lie-algebra coordinates: g(z) = expm(Σ_j z_j A_j) with a
learned matrix A_j per latent (:class:`~latentzoo.models.nets.lie.LieAlgebra`); the flattened
group element is decoded to an image. The encoder also predicts the group features directly
(g_E), and the same image decoder is applied to them. The loss is

    L = Rec + β·KL + λ_rec·‖g_E − g(z)‖² + λ_hes·L_hes + λ_com·L_com

where L_hes = (1/n²) Σ_{i≠j} ‖A_i A_j‖_F² pushes the one-parameter subgroups to act independently
(a Hessian penalty at z = 0) and L_com is the mean squared commutator (weight 0 by default). With
probability ``forward_eg_prob`` per batch the reconstruction term decodes g_E instead of g(z).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from latentzoo.models.base import OptimizerFactory, SchedulerFactory, reparameterize
from latentzoo.models.beta_vae import BetaVAE, gaussian_kl, reconstruction_loss
from latentzoo.models.nets.lie import GroupEncoder, LieAlgebra, check_subgroups, xavier_init_

NetFactory = Callable[..., nn.Module]


def _build(net: nn.Module | NetFactory, **kwargs: Any) -> nn.Module:
    """A configured module, or a partial (``_partial_: true``) completed with ``kwargs``."""
    return net if isinstance(net, nn.Module) else net(**kwargs)


class LieVAE(BetaVAE):
    """Commutative Lie Group VAE with a Gaussian posterior over ``latent_dim`` Lie coordinates.

    ``encoder`` is the conv trunk that outputs the G group features and ``decoder`` the image
    decoder that reads G features; both are usually partials (``_partial_: true``) completed here
    with ``out_features`` / ``in_features`` = G = Σ ``subgroup_sizes``.

    Capabilities: ``encode`` (posterior mean μ), ``decode`` (images in [0, 1]), ``sample``,
    ``reconstruct``.
    """

    def __init__(
        self,
        encoder: nn.Module | NetFactory,
        decoder: nn.Module | NetFactory,
        latent_dim: int = 10,
        subgroup_sizes: Sequence[int] = (100,),
        subspace_sizes: Sequence[int] = (10,),
        lie_alg_init_scale: float = 0.001,
        beta: float = 1.0,
        capacity: float | None = None,
        capacity_leadin: int = 100_000,
        hy_rec: float = 0.1,
        hy_hes: float = 40.0,
        hy_commute: float = 0.0,
        forward_eg_prob: float = 0.2,
        eg_flip: str = "per_batch",
        likelihood: str = "bernoulli",
        no_exp: bool = False,
        xavier_init: bool = True,
        optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
    ) -> None:
        check_subgroups(subgroup_sizes, subspace_sizes, latent_dim)
        if eg_flip not in ("per_batch", "per_sample"):
            raise ValueError(f"eg_flip must be 'per_batch' or 'per_sample', got '{eg_flip}'")
        if not 0.0 <= forward_eg_prob <= 1.0:
            raise ValueError(f"forward_eg_prob must be in [0, 1], got {forward_eg_prob}")
        group_dim = int(sum(subgroup_sizes))
        trunk = _build(encoder, out_features=group_dim)
        image_decoder = _build(decoder, in_features=group_dim)
        super().__init__(
            encoder=GroupEncoder(trunk, subgroup_sizes, subspace_sizes),
            decoder=image_decoder,
            latent_dim=latent_dim,
            beta=beta,
            likelihood=likelihood,
            optimizer=optimizer,
            scheduler=scheduler,
        )
        self.subgroup_sizes = list(subgroup_sizes)
        self.subspace_sizes = list(subspace_sizes)
        self.group_dim = group_dim
        self.capacity = capacity
        self.capacity_leadin = capacity_leadin
        self.hy_rec, self.hy_hes, self.hy_commute = hy_rec, hy_hes, hy_commute
        self.forward_eg_prob = forward_eg_prob
        self.eg_flip = eg_flip
        if no_exp:  # the paper's ablation: an MLP instead of the exponential map
            self.lie = None
            hidden = 4 * latent_dim
            self.group_mlp = nn.Sequential(
                nn.Linear(latent_dim, hidden), nn.ReLU(), nn.Linear(hidden, group_dim)
            )
        else:
            self.lie = LieAlgebra(subgroup_sizes, subspace_sizes, lie_alg_init_scale)
            self.group_mlp = None
        if xavier_init:
            xavier_init_(self)  # conv/linear weights only; the Lie basis keeps its N(0, s²) init

    # --- the model ----------------------------------------------------------------------------
    def posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, logvar, _ = self.encoder(x)
        return mean, logvar

    def group(self, z: torch.Tensor) -> torch.Tensor:
        """Latents (B, L) -> flattened group representation g(z), (B, G)."""
        return self.lie(z) if self.lie is not None else self.group_mlp(z)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [0, 1] through the group representation."""
        return torch.sigmoid(self.decoder(self.group(z)))

    def capacity_at(self, step: int) -> float:
        """The KL target C(step), rising linearly to ``capacity`` over ``capacity_leadin`` steps."""
        assert self.capacity is not None
        return self.capacity * min(1.0, step / max(1, self.capacity_leadin))

    def step(self, batch: Any, stage: str) -> dict[str, torch.Tensor]:
        x = batch[0] if isinstance(batch, list | tuple) else batch
        mean, logvar, g_enc = self.encoder(x)
        z = reparameterize(mean, logvar, self.samples_z(stage))  # μ in val/test (spec §4)
        g_grp = self.group(z)

        # Reconstruct from the encoder's group features with probability p_E (training only).
        flip = stage == "train" and self.forward_eg_prob > 0
        if flip and self.eg_flip == "per_sample":
            use_enc = torch.rand(x.shape[0], device=x.device) < self.forward_eg_prob
            from_grp, from_enc = self.decoder(torch.cat([g_grp, g_enc])).chunk(2)
            logits = torch.where(use_enc.view(-1, 1, 1, 1), from_enc, from_grp)
        elif flip and torch.rand(()) < self.forward_eg_prob:  # CPU RNG: no device sync
            logits = self.decoder(g_enc)
        else:
            logits = self.decoder(g_grp)
        recon = reconstruction_loss(logits, x, self.likelihood).mean()

        kl = gaussian_kl(mean, logvar).sum(1).mean()
        if self.capacity is None:
            kl_term = self.beta * kl
        else:
            kl_term = self.beta * (kl - self.capacity_at(self.global_step)).abs()
        grp = (g_enc - g_grp).pow(2).sum(1).mean()
        if self.lie is not None:
            hes, com = self.lie.hessian_penalty(), self.lie.commutator_penalty()
        else:
            hes = com = kl.new_zeros(())
        loss = recon + kl_term + self.hy_rec * grp + self.hy_hes * hes + self.hy_commute * com
        return {"loss": loss, "recon": recon, "kl": kl, "grp": grp, "hes": hes, "com": com}
