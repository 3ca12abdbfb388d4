"""Flow Factorized Representation Learning (Song, Keller, Sebe, Welling, NeurIPS 2023,
arXiv 2309.13167).

A VAE posterior sample z_0 = Enc(x_0) is moved by one of K latent flows, one per transformation k:
dz/dτ = ∇_z u_k(z, τ), with u_k a learned scalar potential. The sequence x_0..x_S observed under
transformation k is explained by z_t, the flowed code after t frames. Training maximises

    Σ_t log p(x_t | z_t) − KL[q(z_0|x_0) ‖ N(0, I)] − Σ_t KL[q_t ‖ p_{k,t}]

plus the Hamilton–Jacobi residual (∂_τ u + ½‖∇u‖²)² at the visited points, which makes the flows
optimal-transport paths. q_t is q_0 pushed through the Euler steps (change of variables with the
Hessian of u); p_{k,t} = N(μ_{k,t}, σ²_{k,t} I) is a learned per-step prior.

Variants: ``supervised`` (the data's k selects the flow) and ``weak`` (an index network R reads
the whole sequence and picks k by a straight-through Gumbel-softmax; a batch-agreement term makes
the batch agree, since every batch holds one transformation).

Spec: latent_flow.md. Every [ORIGINAL] code choice of the paper's repository that differs from
the paper is a switch here (logdet=rowsum, kl=softmax_surrogate, prior=original +
prior_fixed_d, hj_reduction=original, ic_reduction=mean, time_grid=integer, velocity_at=right,
force, ic_weight, potential out=tanh); the defaults are the [LZ] choices.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from latentzoo.models.base import (
    LatentModel,
    OptimizerFactory,
    SchedulerFactory,
    reparameterize,
)
from latentzoo.models.beta_vae import GaussianVAEMixin, gaussian_kl
from latentzoo.utils.errors import LatentzooError

LOG_2PI = math.log(2 * math.pi)
Potential = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (z (B, d), τ (B,)) -> (B,)


class SequenceBatch(NamedTuple):
    """A batch of sequences. A tuple, so Lightning's and the base class's batch-size logic work."""

    frames: torch.Tensor  # (B, S+1, C, H, W) in [0, 1]
    k: torch.Tensor  # (B,) int64
    factors: Any = None


def as_sequence_batch(batch: Any) -> SequenceBatch:
    if isinstance(batch, SequenceBatch):
        return batch
    if isinstance(batch, dict):
        return SequenceBatch(batch["frames"], batch["k"], batch.get("factors"))
    if isinstance(batch, list | tuple) and len(batch) >= 2:
        return SequenceBatch(*batch[:3])
    raise LatentzooError(
        "LatentFlow needs sequence batches {'frames': (B, S+1, C, H, W), 'k': (B,)}; "
        f"got {type(batch).__name__}. Use a sequence datamodule (data=mnist_seq, ...)."
    )


@contextmanager
def autograd_enabled():
    """The flow needs ∇u even in validation/test, where Lightning runs under inference mode."""
    with torch.inference_mode(False), torch.enable_grad():
        yield


# ---------------------------------------------------------------------------------------------
# The flow step: derivatives of u, log-determinant of the step, HJ residual
# ---------------------------------------------------------------------------------------------


def potential_derivatives(
    potential: Potential, z: torch.Tensor, tau: torch.Tensor, create_graph: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """∇_z u (B, d) and ∂_τ u (B,) of u(z, τ) by autograd (samples are independent, so the
    gradient of Σ_b u_b is the per-sample gradient)."""
    u = potential(z, tau)
    grad_z, grad_t = torch.autograd.grad(
        u.sum(), (z, tau), create_graph=create_graph, allow_unused=True
    )
    if grad_z is None:  # a potential constant in z
        grad_z = torch.zeros_like(z)
    if grad_t is None:  # a time-independent potential
        grad_t = torch.zeros_like(tau)
    return grad_z, grad_t


def hj_residual(
    grad_z: torch.Tensor, grad_t: torch.Tensor, reduction: str = "per_sample"
) -> torch.Tensor:
    """Hamilton–Jacobi residual ∂_τ u + ½|∇_z u|² of each sample (B,).

    ``per_sample`` [LZ]: r_b = ∂_τ u(z_b) + ½‖∇_z u(z_b)‖², the equation at every point.
    ``original`` [ORIGINAL]: the original shares one (1, 1) time tensor across the batch, so its
    ∂_t u is the batch *sum* Σ_b ∂_τ u(z_b), and it averages the squared gradient over batch and
    dimensions: r = Σ_b ∂_τ u_b + ½·mean_{b,d}(∇u)², one value broadcast to every sample.
    """
    if reduction == "per_sample":
        return grad_t + 0.5 * grad_z.pow(2).sum(1)
    if reduction == "original":
        return (grad_t.sum() + 0.5 * grad_z.pow(2).mean()).expand(grad_t.shape[0])
    raise ValueError(f"hj_reduction must be 'per_sample' or 'original', got '{reduction}'")


def match_layout(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A log-density term in the layout of ``like``: per dimension (B, d), as the softmax
    surrogate needs, or the total over dimensions (B,). A total is spread evenly over d."""
    if value.dim() == like.dim():
        return value
    if like.dim() == 1:
        return value.sum(1)
    return value[:, None].expand_as(like) / like.shape[1]


def step_log_det(
    velocity: torch.Tensor,
    z: torch.Tensor,
    step: float,
    method: str,
    create_graph: bool,
) -> torch.Tensor:
    """log|det(I + h·H)| of the Euler map z ↦ z + h∇u(z), H = ∇²u = ∂velocity/∂z.

    ``exact``: slogdet from the full Hessian (d backward passes; small d and tests).
    ``hutchinson``: h·eᵀHe with one Rademacher probe e, an unbiased estimate of h·tr H, the
    first-order change of variables d log q/dτ = −Δu. ``rowsum`` [ORIGINAL]: per dimension
    log|1 + h Σ_j H_ij|, returned as (B, d); the others return (B,).
    """
    if not velocity.requires_grad:  # velocity constant in z (e.g. a zero potential): H = 0
        return torch.zeros(z.shape, device=z.device) if method == "rowsum" else z.new_zeros(len(z))
    if method == "hutchinson":
        probe = torch.randint_like(z, 0, 2) * 2 - 1
        hvp = torch.autograd.grad((velocity * probe).sum(), z, create_graph=create_graph)[0]
        return step * (probe * hvp).sum(1)
    if method == "rowsum":
        row_sums = torch.autograd.grad(velocity.sum(), z, create_graph=create_graph)[0]
        return torch.log((1 + step * row_sums).abs())
    if method == "exact":
        rows = [
            torch.autograd.grad(
                velocity[:, i].sum(), z, create_graph=create_graph, retain_graph=True
            )[0]
            for i in range(z.shape[1])
        ]
        hessian = torch.stack(rows, dim=1)  # (B, d, d), row i = ∂v_i/∂z
        eye = torch.eye(z.shape[1], device=z.device, dtype=z.dtype)
        return torch.linalg.slogdet(eye + step * hessian).logabsdet
    raise ValueError(f"logdet must be 'hutchinson', 'exact' or 'rowsum', got '{method}'")


def gaussian_log_density(
    z: torch.Tensor, mean: torch.Tensor, log_std: torch.Tensor
) -> torch.Tensor:
    """Per-dimension log N(z; mean, exp(log_std)²), broadcasting."""
    return -0.5 * ((z - mean) * torch.exp(-log_std)).pow(2) - log_std - 0.5 * LOG_2PI


def bernoulli_log_likelihood(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """log p(x|z) summed over pixels (B,)."""
    return -F.binary_cross_entropy_with_logits(logits, x, reduction="none").flatten(1).sum(1)


class LatentFlow(GaussianVAEMixin, LatentModel):
    """Latent flows of K transformations on top of a VAE. See the module docstring.

    Capabilities: ``encode`` (posterior mean), ``decode``, ``sample``, ``reconstruct``,
    ``transform(x, k, steps)`` (decoded flow path), ``log_prob(x)`` (ELBO / IWAE),
    ``log_prob_sequence(frames, k)``; ``predict_transform(frames)`` for the weak variant.
    """

    # Only the potentials of the transformations in a batch enter its loss (with
    # ``k_sampling: per_batch``, one of K): the others are unused in that step under DDP.
    ddp_find_unused_parameters = True

    def __init__(
        self,
        encoder: nn.Module,
        decoder: nn.Module,
        potential: Callable[[], nn.Module],
        latent_dim: int,
        num_transforms: int,
        seq_len: int,
        image_shape: Sequence[int],
        variant: str = "supervised",
        k_sampling: str = "per_batch",
        index_net: Callable[..., nn.Module] | None = None,
        force: bool = False,
        time_grid: str = "unit",
        step_size: float | None = None,
        substeps: int = 1,
        velocity_at: str = "left",
        logdet: str = "hutchinson",
        prior: str = "closed_form",
        prior_fixed_d: bool = False,
        kl: str = "monte_carlo",
        hj_reduction: str = "per_sample",
        ic_reduction: str = "sum",
        posterior_sample_eval: bool = False,
        rec_weight: float = 1.0,
        kl0_weight: float = 1.0,
        seq_weight: float = 1.0,
        kl_weight: float = 1.0,
        pde_weight: float = 1.0,
        ic_weight: float = 0.0,
        agree_weight: float = 1.0,
        gumbel_decay: float = 3.0e-5,
        gumbel_min: float = 0.05,
        gumbel_every: int = 100,
        flow_lr: float | None = None,
        index_lr: float | None = None,
        optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
    ) -> None:
        super().__init__(optimizer=optimizer, scheduler=scheduler)
        choices = {
            "variant": (variant, ("supervised", "weak")),
            "k_sampling": (k_sampling, ("per_batch", "per_sample")),
            "time_grid": (time_grid, ("unit", "integer")),
            "velocity_at": (velocity_at, ("left", "right")),
            "logdet": (logdet, ("hutchinson", "exact", "rowsum")),
            "prior": (prior, ("closed_form", "original")),
            "kl": (kl, ("monte_carlo", "softmax_surrogate")),
            "hj_reduction": (hj_reduction, ("per_sample", "original")),
            "ic_reduction": (ic_reduction, ("sum", "mean")),
        }
        for key, (value, allowed) in choices.items():
            if value not in allowed:
                raise LatentzooError(f"model.{key} must be one of {allowed}, got '{value}'")
        if variant == "weak" and k_sampling == "per_sample":
            raise LatentzooError(
                "model.variant=weak needs one transformation per batch (data "
                "k_sampling=per_batch): its batch-agreement term pushes the batch to one k."
            )
        if hj_reduction == "original" and variant == "supervised" and k_sampling == "per_sample":
            raise LatentzooError(
                "model.hj_reduction=original takes batch-level sums and means, which assume one "
                "transformation per batch: use data k_sampling=per_batch or hj_reduction=per_sample"
            )
        if prior_fixed_d and prior != "original":
            raise LatentzooError(
                "model.prior_fixed_d=true changes the original's scalar prior update; it needs "
                "model.prior=original (the closed-form prior has no D)"
            )
        if variant == "weak" and index_net is None:
            raise LatentzooError("model.variant=weak needs model.index_net (the index predictor R)")
        if substeps < 1 or seq_len < 1:
            raise LatentzooError(f"substeps and seq_len must be >= 1, got {substeps}, {seq_len}")
        self.save_hyperparameters(
            logger=False,
            ignore=["encoder", "decoder", "potential", "index_net", "optimizer", "scheduler"],
        )
        self.encoder, self.decoder = (
            encoder,
            decoder,
        )  # image -> 2d (mean, log-variance); z -> logits
        self.latent_dim, self.num_transforms, self.seq_len = latent_dim, num_transforms, seq_len
        self.image_shape = tuple(image_shape)
        self.variant, self.k_sampling = variant, k_sampling
        self.potentials = nn.ModuleList([potential() for _ in range(num_transforms)])
        self.forces = nn.ModuleList([potential() for _ in range(num_transforms)]) if force else None
        # Per-step prior N(μ_{k,t}, σ²_{k,t} I), scalars per (k, t); σ is stored as log σ (init 1).
        self.prior_mean = nn.Parameter(torch.zeros(num_transforms, seq_len))
        self.prior_log_std = nn.Parameter(torch.zeros(num_transforms, seq_len))
        self.index_net = None
        if variant == "weak":
            channels, height, width = self.image_shape
            self.index_net = index_net(
                image_shape=[channels * (seq_len + 1), height, width], out_features=num_transforms
            )
        # Frame duration: τ ∈ [0, 1] over the training sequence [LZ], or τ = t, Δ = 1 [ORIGINAL].
        self.frame_step = step_size or (1.0 / seq_len if time_grid == "unit" else 1.0)
        self.substeps, self.velocity_at = substeps, velocity_at
        self.logdet_method, self.prior_kind, self.kl_kind = logdet, prior, kl
        self.prior_fixed_d = prior_fixed_d
        self.hj_reduction, self.ic_reduction = hj_reduction, ic_reduction
        self.posterior_sample_eval = posterior_sample_eval
        self.weights = {
            "rec": rec_weight,
            "kl0": kl0_weight,
            "seq": seq_weight,
            "kl_flow": kl_weight,
            "pde": pde_weight,
            "ic": ic_weight,
            "agree": agree_weight,
        }
        self.gumbel = (gumbel_decay, gumbel_min, gumbel_every)
        self.flow_lr, self.index_lr = flow_lr, index_lr

    # ----------------------------------------------------------------------------------- VAE
    # posterior, encode, decode, sample, reconstruct: GaussianVAEMixin (N(0, I) prior at t = 0)

    # ---------------------------------------------------------------------------------- flow

    def _tau(self, frame: int, sub: int) -> float:
        h = self.frame_step / self.substeps
        left = (frame - 1) * self.frame_step + sub * h
        return left + h if self.velocity_at == "right" else left

    def _active_flows(self, weights: torch.Tensor, create_graph: bool) -> list[int]:
        """The k whose potential moves some sample; all K when training the weak variant
        (straight-through: ∂L/∂ŷ_k needs every u_k)."""
        if self.variant == "weak" and create_graph:
            return list(range(self.num_transforms))
        return [k for k in range(self.num_transforms) if bool(weights[:, k].ne(0).any())]

    def _velocity_and_residuals(
        self,
        z: torch.Tensor,
        tau: torch.Tensor,
        weights: torch.Tensor,
        active: list[int],
        create_graph: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The mixture velocity Σ_k w_bk ∇u_k (B, d) and each flow's squared HJ residual (B, K)
        (+ f_k² inside the residual when ``force``)."""
        velocity = torch.zeros_like(z)
        residual_sq = z.new_zeros(z.shape[0], self.num_transforms)
        for k in active:
            grad_z, grad_t = potential_derivatives(
                self.potentials[k], z, tau, create_graph=create_graph
            )
            velocity = velocity + weights[:, k, None] * grad_z
            residual = hj_residual(grad_z, grad_t, self.hj_reduction)
            if self.forces is not None:
                residual = residual + self.forces[k](z, tau).pow(2)
            residual_sq[:, k] = residual.pow(2)
        return velocity, residual_sq

    def _pde_loss(
        self, residual_sq: torch.Tensor, weights: torch.Tensor, mean_weights: torch.Tensor | None
    ) -> torch.Tensor:
        """PDE term of one step: mean_b r²_b of the sample's flow (supervised), or
        Σ_k p̄_k·mean_b r²_kb with p̄ the batch mean of R's one-hot (weak)."""
        if self.variant == "weak":
            return (mean_weights * residual_sq.mean(0)).sum()
        return (weights * residual_sq).sum(1).mean()

    def _mixed_log_prior(self, z: torch.Tensor, t: int, weights: torch.Tensor) -> torch.Tensor:
        """Σ_k w_bk log p_{k,t}(z_b) per dimension (B, d); steps past training reuse the last."""
        idx = min(t, self.seq_len) - 1
        mean = self.prior_mean[:, idx][None, :, None]  # (1, K, 1)
        log_std = self.prior_log_std[:, idx][None, :, None]
        per_k = gaussian_log_density(z[:, None, :], mean, log_std)  # (B, K, d)
        return (weights[:, :, None] * per_k).sum(1)

    def _original_prior_shrink(self, t: int, weights: torch.Tensor) -> torch.Tensor:
        """[ORIGINAL] per-dimension decrement log|1 + D/(σ²_{k,t} + 1e-5)| of log p at step t
        (B,), D = 1. With ``prior_fixed_d`` the t = 1 step is log|1 + D| = log 2 whatever σ, as
        the original's diffusion prior returns D itself at its first step."""
        if t == 1 and self.prior_fixed_d:
            return weights.sum(1) * math.log(2.0)
        idx = min(t, self.seq_len) - 1
        variance = torch.exp(2 * self.prior_log_std[:, idx])  # (K,)
        return (weights * torch.log1p(1.0 / (variance + 1e-5))).sum(1)

    def _prior_log_density(
        self, z: torch.Tensor, t: int, weights: torch.Tensor, log_p: torch.Tensor
    ) -> torch.Tensor:
        """log p_{k,t} after step t, in the layout of the previous ``log_p``: the closed form
        at the flowed z [LZ], or the original's scalar update of the previous value."""
        if self.prior_kind == "closed_form":
            return match_layout(self._mixed_log_prior(z, t, weights), log_p)
        shrink = self._original_prior_shrink(t, weights)  # the same for every dimension
        return log_p - match_layout(shrink[:, None].expand_as(z), log_p)

    def flow(
        self,
        z0: torch.Tensor,
        weights: torch.Tensor,
        steps: int,
        *,
        create_graph: bool = False,
        density: bool = False,
        log_q0: torch.Tensor | None = None,
        log_p0: torch.Tensor | None = None,
        mean_weights: torch.Tensor | None = None,
    ) -> dict[str, Any]:
        """Move z0 (B, d) for ``steps`` frames along the mixture Σ_k w_bk ∇u_k.

        ``weights`` (B, K): one-hot k (supervised) or R's straight-through one-hot (weak).
        Returns ``z`` (list of steps+1 codes); with ``density`` also, per frame, ``log_q`` and
        ``log_p`` (in the layout of ``log_q0``: (B,), or (B, d) for the softmax surrogate),
        the PDE loss ``pde`` and the squared residuals ``pde_k`` (B, K).
        ``create_graph`` keeps the graph for training; otherwise every step is detached.
        """
        h = self.frame_step / self.substeps
        active = self._active_flows(weights, create_graph)
        z, log_q, log_p = z0, log_q0, log_p0
        out: dict[str, Any] = {"z": [z0], "log_q": [], "log_p": [], "pde": [], "pde_k": []}
        for frame in range(1, steps + 1):
            pde, pde_k = 0.0, 0.0
            for sub in range(self.substeps):
                if not z.requires_grad:
                    z = z.detach().requires_grad_(True)
                tau = z.new_full((z.shape[0],), self._tau(frame, sub))
                velocity, residual_sq = self._velocity_and_residuals(
                    z, tau.requires_grad_(True), weights, active, density or create_graph
                )
                if density:
                    pde = pde + self._pde_loss(residual_sq, weights, mean_weights) / self.substeps
                    pde_k = pde_k + residual_sq / self.substeps
                    log_det = step_log_det(velocity, z, h, self.logdet_method, create_graph)
                    log_q = log_q - match_layout(log_det, log_q)
                z = z + h * velocity
                if not create_graph:
                    z = z.detach()
                    log_q = log_q.detach() if log_q is not None else None
            out["z"].append(z)
            if density:
                log_p = self._prior_log_density(
                    z if create_graph else z.detach(), frame, weights, log_p
                )
                out["log_q"].append(log_q)
                out["log_p"].append(log_p)
                out["pde"].append(pde)
                out["pde_k"].append(pde_k)
        return out

    def _start_log_densities(
        self, z0: torch.Tensor, mean: torch.Tensor, log_std: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """log q(z0|x) and log N(z0; 0, I): per dimension (B, d) for the softmax surrogate,
        totals (B,) otherwise."""
        log_q0 = gaussian_log_density(z0, mean, log_std)
        log_p0 = gaussian_log_density(z0, torch.zeros_like(z0), torch.zeros_like(z0))
        if self.kl_kind == "softmax_surrogate":
            return log_q0, log_p0
        return log_q0.sum(1), log_p0.sum(1)

    def _one_hot(self, k: torch.Tensor | int, batch: int) -> torch.Tensor:
        if not torch.is_tensor(k):
            k = torch.full((batch,), int(k), dtype=torch.long, device=self.device)
        if k.numel() == 1:
            k = k.reshape(1).expand(batch)
        if int(k.min()) < 0 or int(k.max()) >= self.num_transforms:
            raise LatentzooError(f"k must be in [0, {self.num_transforms}), got {k.tolist()}")
        return F.one_hot(k.to(self.device).long(), self.num_transforms).float()

    # ------------------------------------------------------------------------- index predictor

    def _index_input(self, frames: torch.Tensor) -> torch.Tensor:
        """Frames (B, T, C, H, W) -> R's input (B, (S+1)·C, H, W): truncate, or repeat the last
        frame when an evaluation sequence is shorter than the training ones."""
        need = self.seq_len + 1
        if frames.shape[1] < need:
            pad = frames[:, -1:].expand(-1, need - frames.shape[1], -1, -1, -1)
            frames = torch.cat([frames, pad], dim=1)
        return frames[:, :need].flatten(1, 2)

    def gumbel_temperature(self, step: int | None = None) -> float:
        decay, minimum, every = self.gumbel
        step = self.global_step if step is None else step
        return max(math.exp(-decay * (step // every) * every), minimum)

    @torch.no_grad()
    def predict_transform(self, frames: torch.Tensor) -> torch.Tensor:
        """Weak variant: k̂ = argmax R(sequence) (B,). Indices are R's own (a permutation of k)."""
        if self.index_net is None:
            raise LatentzooError("predict_transform needs the weak variant (model.variant=weak)")
        return self.index_net(self._index_input(frames)).argmax(1)

    # ----------------------------------------------------------------------------- capabilities

    @torch.no_grad()
    def transform(self, x: torch.Tensor, k: torch.Tensor | int, steps: int) -> torch.Tensor:
        """Decoded frames (steps+1, B, C, H, W) along the flow of k from μ(x); frame 0 = Dec(μ)."""
        with autograd_enabled():
            mean, logvar = self.posterior(x.clone())
            # [ORIGINAL] posterior_sample_eval: a posterior sample (E_k is stochastic)
            z0 = reparameterize(mean.detach(), logvar.detach(), self.posterior_sample_eval)
            path = self.flow(z0, self._one_hot(k, x.shape[0]), steps)["z"]
            return torch.stack([self.decode(z).detach() for z in path])

    def _log_likelihood(
        self, logits: torch.Tensor, x: torch.Tensor, likelihood: str
    ) -> torch.Tensor:
        if likelihood == "bernoulli":
            return bernoulli_log_likelihood(logits, x)
        if likelihood == "gaussian_unit":  # [ORIGINAL] log N(x; x̂, I) with its constant
            sq = (torch.sigmoid(logits) - x).pow(2).flatten(1)
            return -0.5 * sq.sum(1) - 0.5 * sq.shape[1] * LOG_2PI
        raise ValueError(f"likelihood must be 'bernoulli' or 'gaussian_unit', got '{likelihood}'")

    @torch.no_grad()
    def log_prob(
        self, x: torch.Tensor, num_samples: int = 1, likelihood: str = "bernoulli"
    ) -> torch.Tensor:
        """Per-image estimate of log p(x) in nats (B,): ELBO for one sample, IWAE for more:
        log (1/M) Σ_m p(x|z_m) N(z_m; 0, I) / q(z_m|x), z_m ~ q(z|x)."""
        mean, logvar = self.posterior(x)
        log_std = 0.5 * logvar
        terms = []
        for _ in range(num_samples):
            z = reparameterize(mean, logvar)
            log_w = (
                self._log_likelihood(self.decoder(z), x, likelihood)
                + gaussian_log_density(z, torch.zeros_like(z), torch.zeros_like(z)).sum(1)
                - gaussian_log_density(z, mean, log_std).sum(1)
            )
            terms.append(log_w)
        return torch.logsumexp(torch.stack(terms), 0) - math.log(num_samples)

    @torch.no_grad()
    def log_prob_sequence(
        self, frames: torch.Tensor, k: torch.Tensor | int, likelihood: str = "bernoulli"
    ) -> torch.Tensor:
        """log p(x_t|z_t) + log p_{k,t}(z_t) − log q_t(z_t) for t = 1..S (B, S), z_0 ~ q(z|x_0),
        z_t its flow. An estimate (q_t is the pushed-forward posterior of x_0), not a bound."""
        steps = frames.shape[1] - 1
        with autograd_enabled():
            frames = frames.clone()
            mean, logvar = self.posterior(frames[:, 0])
            mean, logvar = mean.detach(), logvar.detach()
            log_std = 0.5 * logvar
            z0 = reparameterize(mean, logvar)
            weights = self._one_hot(k, frames.shape[0])
            log_q0, log_p0 = self._start_log_densities(z0, mean, log_std)
            out = self.flow(
                z0,
                weights,
                steps,
                density=True,
                log_q0=log_q0,
                log_p0=log_p0,
                mean_weights=weights.mean(0),
            )
            values = []
            for t in range(1, steps + 1):
                log_lik = self._log_likelihood(self.decoder(out["z"][t]), frames[:, t], likelihood)
                log_q, log_p = out["log_q"][t - 1], out["log_p"][t - 1]
                if log_q.dim() == 2:
                    log_q, log_p = log_q.sum(1), log_p.sum(1)
                values.append((log_lik + log_p - log_q).detach())
        return torch.stack(values, dim=1)

    # ------------------------------------------------------------------------------- training

    def setup(self, stage: str) -> None:
        """Refuse a datamodule whose K or image shape differ from the model's (the config's
        fallback K = 3 applies only when the data config does not name num_transforms)."""
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer else None
        num_k = getattr(datamodule, "num_transforms", None)
        if num_k is not None and int(num_k) != self.num_transforms:
            raise LatentzooError(
                f"the data has {num_k} transformations but the model {self.num_transforms}; "
                f"set model.num_transforms={num_k}"
            )
        shape = getattr(datamodule, "image_shape", None)
        if shape is not None and tuple(shape) != self.image_shape:
            raise LatentzooError(
                f"data image_shape {list(shape)} != model {list(self.image_shape)}"
            )

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        return as_sequence_batch(batch)

    def step(self, batch: Any, stage: str) -> dict[str, torch.Tensor]:
        if stage == "train":
            return self._loss(as_sequence_batch(batch), stage)
        with autograd_enabled():  # validation/test run under inference mode
            batch = as_sequence_batch(batch)
            batch = SequenceBatch(batch.frames.clone(), batch.k.clone(), batch.factors)
            return {name: value.detach() for name, value in self._loss(batch, stage).items()}

    def _loss(self, batch: SequenceBatch, stage: str) -> dict[str, torch.Tensor]:
        frames, k = batch.frames, batch.k.long()
        batch_size, steps = frames.shape[0], frames.shape[1] - 1
        x0 = frames[:, 0]
        mean, logvar = self.posterior(x0)
        log_std = 0.5 * logvar
        z0 = reparameterize(mean, logvar)
        terms: dict[str, torch.Tensor] = {}

        if self.variant == "weak":
            if stage == "train" and bool((k != k[0]).any()):
                raise LatentzooError(
                    "the weak variant needs one transformation per batch (k_sampling=per_batch); "
                    f"this batch mixes k = {sorted(set(k.tolist()))}"
                )
            logits = self.index_net(self._index_input(frames))
            weights = F.gumbel_softmax(logits, tau=self.gumbel_temperature(), hard=True)
            mean_weights = weights.mean(0)
            # KL(onehot(argmax p̄) ‖ p̄) = −log p̄[argmax]: the batch should agree on one flow.
            terms["agree"] = -torch.log(mean_weights.max().clamp_min(1e-8))
            terms["gumbel_tau"] = torch.tensor(self.gumbel_temperature(), device=frames.device)
            terms["index_acc_raw"] = (logits.argmax(1) == k).float().mean()  # before matching
        else:
            weights = self._one_hot(k, batch_size)
            mean_weights = weights.mean(0)

        surrogate = self.kl_kind == "softmax_surrogate"
        log_q0, log_p0 = self._start_log_densities(z0, mean, log_std)
        out = self.flow(
            z0,
            weights,
            steps,
            create_graph=True,
            density=True,
            log_q0=log_q0,
            log_p0=log_p0,
            mean_weights=mean_weights,
        )

        logits_all = self.decoder(torch.cat(out["z"]))  # one decoder pass for all frames
        targets = frames.transpose(0, 1).flatten(0, 1)  # (S+1)·B images, frame-major
        nll = F.binary_cross_entropy_with_logits(logits_all, targets, reduction="none")
        nll = nll.flatten(1).sum(1).view(steps + 1, batch_size)  # (S+1, B)
        terms["recon"] = nll[0].mean()
        terms["kl0"] = gaussian_kl(mean, logvar).sum(1).mean()
        terms["seq_rec"] = nll[1:].sum(0).mean()

        if surrogate:  # [ORIGINAL] KL(softmax_d(exp ρ_p) ‖ softmax_d(exp ρ_q)), batch mean
            kl_t = [
                F.kl_div(
                    F.log_softmax(lq.exp(), dim=1),
                    F.log_softmax(lp.exp(), dim=1),
                    reduction="batchmean",
                    log_target=True,
                )
                for lq, lp in zip(out["log_q"], out["log_p"], strict=True)
            ]
            kl_b = None
        else:  # single-sample Monte-Carlo KL[q_t ‖ p_{k,t}]
            kl_b = torch.stack([lq - lp for lq, lp in zip(out["log_q"], out["log_p"], strict=True)])
            kl_t = list(kl_b.mean(1))
        terms["kl_flow"] = torch.stack(kl_t).sum()
        terms["pde"] = torch.stack(out["pde"]).sum()
        terms["ic"] = self._initial_condition(z0, weights, mean_weights)

        loss = (
            self.weights["rec"] * terms["recon"]
            + self.weights["kl0"] * terms["kl0"]
            + self.weights["seq"] * terms["seq_rec"]
            + self.weights["kl_flow"] * terms["kl_flow"]
            + self.weights["pde"] * terms["pde"]
            + self.weights["ic"] * terms["ic"]
        )
        if "agree" in terms:
            loss = loss + self.weights["agree"] * terms["agree"]

        # Per-transformation terms (true k), for the logs.
        pde_kb = torch.stack(out["pde_k"]).sum(0)  # (B, K)
        for kk in k.unique().tolist():
            mask = k == kk
            terms[f"seq_rec/k{kk}"] = nll[1:, mask].sum(0).mean()
            terms[f"pde/k{kk}"] = (pde_kb[mask] * weights[mask]).sum(1).mean()
            if kl_b is not None:
                terms[f"kl_flow/k{kk}"] = kl_b[:, mask].sum(0).mean()
        return {"loss": loss, **{name: value for name, value in terms.items()}}

    def _initial_condition(
        self, z0: torch.Tensor, weights: torch.Tensor, mean_weights: torch.Tensor
    ) -> torch.Tensor:
        """[ORIGINAL] IC term: ‖∇u_k(z, 0)‖² (+ f_k(z, 0)²), batch mean, weighted over k (summed
        over k in the weak variant, not only the last k as in the original loop). The squared
        gradient is summed over dimensions (``ic_reduction: sum``) or averaged over them as in
        the original (``mean``)."""
        if self.weights["ic"] == 0:
            return torch.zeros((), device=z0.device)
        if not z0.requires_grad:  # a fixed code (tests, a detached posterior)
            z0 = z0.detach().requires_grad_(True)
        tau = z0.new_zeros(z0.shape[0]).requires_grad_(True)
        total = torch.zeros((), device=z0.device)
        for k in range(self.num_transforms):
            if not bool(weights[:, k].ne(0).any()) and self.variant != "weak":
                continue
            grad_z, _ = potential_derivatives(self.potentials[k], z0, tau, create_graph=True)
            value = grad_z.pow(2).sum(1) if self.ic_reduction == "sum" else grad_z.pow(2).mean(1)
            if self.forces is not None:
                value = value + self.forces[k](z0, tau).pow(2)
            if self.variant == "weak":
                total = total + mean_weights[k] * value.mean()
            else:
                total = total + (weights[:, k] * value).mean()
        return total

    def optimizer_params(self) -> list[dict]:
        """One Adam over three parameter groups (VAE; potentials + prior; R) with their own
        learning rates: identical to the original's separate Adams (Adam is per-parameter)."""
        flow = [*self.potentials.parameters(), self.prior_mean, self.prior_log_std]
        if self.forces is not None:
            flow += list(self.forces.parameters())
        groups = [
            {"params": [*self.encoder.parameters(), *self.decoder.parameters()], "name": "vae"},
            {"params": flow, "name": "flow"},
        ]
        if self.flow_lr is not None:
            groups[1]["lr"] = self.flow_lr
        if self.index_net is not None:
            groups.append({"params": list(self.index_net.parameters()), "name": "index"})
            if self.index_lr is not None:
                groups[2]["lr"] = self.index_lr
        return groups
