"""β-TCVAE (Chen, Li, Grosse, Duvenaud, "Isolating Sources of Disentanglement in VAEs",
NeurIPS 2018, arXiv:1802.04942).

The KL term of the ELBO, averaged over the data, splits into three parts (their eq. 2):

    E_p(x)[KL(q(z|x) ‖ p(z))] = I_q(x; z)                 index-code mutual information (MI)
                              + KL(q(z) ‖ Π_j q(z_j))     total correlation (TC)
                              + Σ_j KL(q(z_j) ‖ p(z_j))   dimension-wise KL

and β-TCVAE weighs them α, β, γ (α = γ = 1 by default, so only the TC is up-weighted). The
aggregate densities log q(z) and log q(z_j) are estimated on the minibatch: "mws" is minibatch
weighted sampling (their eq. S6, every pair weighted 1/(NM)), "mss" minibatch stratified sampling
(Appendix C.2). N is the training-set size.

The loss is recon + KL + (α−1)·MI + (β−1)·TC + (γ−1)·dimKL, with the closed-form KL. The three
sampled parts sum to a one-sample estimate of the same KL, so this equals the paper's
recon + α·MI + β·TC + γ·dimKL in expectation and is disentanglement_lib's β-TCVAE loss when
α = γ = 1 (its ``BetaTCVAE.regularizer``).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from latentzoo.models.base import OptimizerFactory, SchedulerFactory
from latentzoo.models.beta_vae import BetaVAE, gaussian_kl

ESTIMATORS = ("mws", "mss")


def gaussian_log_density(z: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """log N(z; mean, exp(logvar)) elementwise (broadcasting)."""
    return -0.5 * (math.log(2 * math.pi) + logvar + (z - mean).pow(2) * torch.exp(-logvar))


def _log_weights(batch_size: int, dataset_size: int, estimator: str, like: torch.Tensor):
    """log w_ij of the minibatch estimate log q(z_i) ≈ log Σ_j w_ij q(z_i | x_j)."""
    if estimator == "mws":
        return -math.log(dataset_size * batch_size)  # the same weight for every pair
    # MSS: the sample's own posterior has weight 1/N, one "stratum" neighbour (N−M)/(NM) and the
    # other M−1 members 1/M, with M = batch − 1; each row sums to 1.
    n, m = dataset_size, batch_size - 1
    weights = torch.full((batch_size, batch_size), 1.0 / m, dtype=like.dtype, device=like.device)
    rows = torch.arange(batch_size, device=like.device)
    weights[rows, (rows + 1) % batch_size] = (n - m) / (n * m)
    weights[rows, rows] = 1.0 / n
    return weights.log()


def kl_decomposition(
    z: torch.Tensor,
    mean: torch.Tensor,
    logvar: torch.Tensor,
    dataset_size: int,
    estimator: str = "mws",
) -> dict[str, torch.Tensor]:
    """Minibatch estimates of MI, TC and dimension-wise KL (batch means), eq. 2 of the paper.

    ``z`` (B, D) are samples of q(z|x_i) with parameters ``mean``/``logvar`` (B, D).
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got '{estimator}'")
    batch_size = z.shape[0]
    if estimator == "mss" and batch_size < 3:
        raise ValueError("the MSS estimator needs a batch of at least 3 samples")
    # log q(z_i^d | x_j) for every pair (i, j) and dimension d: (B, B, D)
    pairwise = gaussian_log_density(z.unsqueeze(1), mean.unsqueeze(0), logvar.unsqueeze(0))
    log_w = _log_weights(batch_size, dataset_size, estimator, z)
    if isinstance(log_w, torch.Tensor):
        log_qz = torch.logsumexp(pairwise.sum(2) + log_w, dim=1)
        log_qz_marginals = torch.logsumexp(pairwise + log_w.unsqueeze(2), dim=1)
    else:
        log_qz = torch.logsumexp(pairwise.sum(2), dim=1) + log_w
        log_qz_marginals = torch.logsumexp(pairwise, dim=1) + log_w
    log_prod_qz = log_qz_marginals.sum(1)
    log_qz_given_x = gaussian_log_density(z, mean, logvar).sum(1)
    log_pz = gaussian_log_density(z, torch.zeros_like(z), torch.zeros_like(z)).sum(1)
    return {
        "mi": (log_qz_given_x - log_qz).mean(),
        "tc": (log_qz - log_prod_qz).mean(),
        "dim_kl": (log_prod_qz - log_pz).mean(),
    }


class BetaTCVAE(BetaVAE):
    """β-VAE whose KL penalty is decomposed, with weight β on the total correlation.

    ``dataset_size`` (N in the estimators) may be left ``None``: it is then read from the
    training dataloader when the Trainer sets the model up. Val/test losses use posterior
    samples, as Chen et al.'s code does: the TC/MI estimators are defined on samples of q(z|x).
    """

    sample_in_eval = True

    def __init__(
        self,
        encoder: nn.Module,
        decoder: nn.Module,
        latent_dim: int = 10,
        beta: float = 6.0,
        alpha: float = 1.0,
        gamma: float = 1.0,
        estimator: str = "mws",
        dataset_size: int | None = None,
        likelihood: str = "bernoulli",
        optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
    ) -> None:
        super().__init__(
            encoder=encoder,
            decoder=decoder,
            latent_dim=latent_dim,
            beta=beta,
            likelihood=likelihood,
            optimizer=optimizer,
            scheduler=scheduler,
        )
        if estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got '{estimator}'")
        if dataset_size is not None and dataset_size < 1:
            raise ValueError(f"dataset_size must be positive, got {dataset_size}")
        self.alpha, self.gamma = alpha, gamma
        self.estimator = estimator
        self.dataset_size = dataset_size

    def setup(self, stage: str) -> None:
        if self.dataset_size is None and self._trainer is not None:
            datamodule = self.trainer.datamodule
            if datamodule is not None and hasattr(datamodule, "train_dataloader"):
                self.dataset_size = len(datamodule.train_dataloader().dataset)

    def regulariser(self, mean: torch.Tensor, logvar: torch.Tensor, z: torch.Tensor) -> dict:
        if self.dataset_size is None:
            raise ValueError(
                "BetaTCVAE needs the training-set size N for its TC estimate: set "
                "model.dataset_size, or train with a datamodule that has a train_dataloader"
            )
        kl = gaussian_kl(mean, logvar).sum(1).mean()
        parts = kl_decomposition(z, mean, logvar, self.dataset_size, self.estimator)
        reg = (
            kl
            + (self.alpha - 1.0) * parts["mi"]
            + (self.beta - 1.0) * parts["tc"]
            + (self.gamma - 1.0) * parts["dim_kl"]
        )
        return {"kl": kl, **parts, "reg": reg}
