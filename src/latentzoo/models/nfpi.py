"""NFPI: a class-conditional normalizing flow whose Gaussian prior is fitted by fixed-point
iteration (Enescu & Sahbi, "Learning conditionally untangled latent spaces using Fixed Point
Iteration", BMVC 2024; reference code vic-ene/NFPI). Spec: nfpi.md.

An unconditional MEF/Glow flow f (``nets/glow.py``) maps a dequantised image to z of the same
shape. Class information lives only in the prior, one diagonal Gaussian N(μ_c, diag v_c) per
class, kept as **buffers** (no gradient, saved in checkpoints). The flow trains by SGD on

    NLL(x, y) = −[log N(f(x); μ_y, v_y) + log|det ∂f/∂x| − D·log 128]      (bits/dim = NLL/(D ln 2))

(the −D log 128: 256 quantisation bins and the ×2 rescale to [-1, 1)). The Gaussians are set from
the class moments of z after the data init, and at the ``fpi_epochs`` hook (default: after
epoch 0, the original's effective control flow) re-fitted by :func:`fixed_point_iteration`, which
balances the class likelihood against K-weighted pairwise KLs that push the classes apart.

Capabilities: ``log_prob(x, y=None)`` (log p(x) in nats per image; marginal over classes when
``y`` is None), ``bpd(x, y=None)``, ``classify(x)``, ``class_scores(x)``, ``sample(n, labels,
temperature)``. Evaluation and sampling use the EMA weights once the EMA has been updated.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from latentzoo.models.base import LatentModel, OptimizerFactory, SchedulerFactory
from latentzoo.models.ema import EMA, EMACheckpoint
from latentzoo.models.nets.glow import Glow
from latentzoo.utils.errors import LatentzooError
from latentzoo.utils.logging import RankedLogger

log = RankedLogger(__name__, rank_zero_only=True)

FPI_METHODS = ("nf_kld", "moments", "data_init")


# ---------------------------------------------------------------------------------- the FPI
def pairwise_kl(mu: torch.Tensor, v: torch.Tensor, rows: slice | None = None) -> torch.Tensor:
    """KL(N_i ‖ N_j) for diagonal Gaussians, (k, k) (only the i in ``rows`` when given)."""
    rows = rows if rows is not None else slice(None)
    mi, mj = mu[rows, None], mu[None]
    vi, vj = v[rows, None], v[None]
    return 0.5 * (vi / vj + (mj - mi) ** 2 / vj - 1 + torch.log(vj) - torch.log(vi)).sum(-1)


def _kl_rows(mu: torch.Tensor, v: torch.Tensor, start: int, rows: int) -> torch.Tensor:
    return pairwise_kl(mu, v, slice(start, start + rows))


def kl_kernel(kl: torch.Tensor, exp_den_update: int = 1) -> torch.Tensor:
    """K_ij weighting of the pairwise KLs; K_ii = 0 (spec §6)."""
    k = kl.shape[0]
    off = ~torch.eye(k, dtype=torch.bool, device=kl.device)
    kl = kl.clamp_min(1e-8)  # identical Gaussians (e.g. all at the init) would give 0/0
    den = 10 * kl if exp_den_update else (10 * kl[off]).mean()
    kernel = torch.exp(-kl / den) / den
    return torch.where(off, kernel, torch.zeros_like(kernel))


def fixed_point_iteration(
    m: torch.Tensor,
    s: torch.Tensor,
    mu: torch.Tensor,
    v: torch.Tensor,
    lambda_mu: float,
    lambda_sigma: float,
    update_mu: bool = True,
    update_sigma: bool = True,
    variant: str = "code",
    exp_den_update: int = 1,
    isotropic_var_for_mean: bool = False,
    tol_mu: float = 0.1,
    tol_sigma: float = 0.1,
    max_iter: int = 1000,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """Fit class Gaussians (μ, v) to the class data moments (m, s), repelled by pairwise KLs.

    All (k, D). Runs in float64; λ's are normalised by k(k−1). ``variant='code'`` is the
    released update v ← √(B/A) with Q_j = Σ_l (μ_j − μ_l)² (fixed point v³ = s at λ = 0);
    ``'derived'`` is v ← v·√(B/A) with the pairwise (μ_i − μ_j)² (fixed point v = s), see §11.
    Returns the new (μ, v) and {iterations, delta_mu, delta_sigma}.
    """
    if variant not in ("code", "derived"):
        raise ValueError(f"fpi_variant must be 'code' or 'derived', got '{variant}'")
    dtype = m.dtype
    m, s, mu, v = (t.double() for t in (m, s, mu, v))
    k = m.shape[0]
    norm = k * (k - 1) if k > 1 else 1
    lam_mu, lam_v = lambda_mu / norm, lambda_sigma / norm
    d_mu = d_v = 0.0
    iterations = 0
    for iterations in range(1, max_iter + 1):  # noqa: B007 (reported after the loop)
        kernel = kl_kernel(pairwise_kl(mu, v), exp_den_update)  # K[i, j]
        new_mu, new_v = mu, v
        if update_mu:
            vm = v.mean(1, keepdim=True).expand_as(v) if isotropic_var_for_mean else v
            # Σ_j (K_ij/v_j + K_ji/v_i)(μ_i − μ_j), per dimension
            diff = mu[:, None] - mu[None]  # (i, j, D)
            w = kernel[..., None] / vm[None] + kernel.T[..., None] / vm[:, None]
            new_mu = m + lam_mu * vm * (w * diff).sum(1)
        if update_sigma:
            tau = lam_v * (kernel - kernel.T).sum(1, keepdim=True)  # (k, 1)
            b = s + lam_v * v**2 * (kernel @ (1 / v))
            if variant == "code":
                q = ((mu[:, None] - mu[None]) ** 2).sum(1)  # Q_j = Σ_l (μ_j − μ_l)²
                a = (1 + tau) * v + lam_v * (kernel.T @ (q + v))
                new_v = torch.sqrt(b / a)
            else:
                q = (mu[:, None] - mu[None]) ** 2  # pairwise (μ_i − μ_j)², (i, j, D)
                a = (1 + tau) * v + lam_v * (kernel.T[..., None] * (q + v[None])).sum(1)
                new_v = v * torch.sqrt(b / a)
        d_mu = float((new_mu - mu).norm(dim=1).max())
        d_v = float((new_v - v).norm(dim=1).max())
        mu, v = new_mu, new_v
        if d_mu <= tol_mu and d_v <= tol_sigma:
            break
    info = {"iterations": float(iterations), "delta_mu": d_mu, "delta_sigma": d_v}
    return mu.to(dtype), v.to(dtype), info


def kl_summary(mu: torch.Tensor, v: torch.Tensor) -> dict[str, float]:
    """Min / max / mean pairwise KL (off-diagonal) between class Gaussians (rows in chunks of
    about 64 MB, so 1000 ImageNet classes fit)."""
    mu, v = mu.double(), v.double()
    rows = max(1, 2**23 // (mu.shape[0] * mu.shape[1]))
    kl = torch.cat([_kl_rows(mu, v, i, rows) for i in range(0, len(mu), rows)])
    off = kl[~torch.eye(len(kl), dtype=torch.bool, device=kl.device)]
    if off.numel() == 0:
        return {}
    return {"kl_min": float(off.min()), "kl_max": float(off.max()), "kl_mean": float(off.mean())}


def _in(interval: Sequence[int] | None, epoch: int) -> bool:
    return interval is not None and interval[0] <= epoch < interval[1]


# ---------------------------------------------------------------------------------- the model
class NFPI(EMACheckpoint, LatentModel):
    """Class-conditional flow with a FPI-fitted diagonal Gaussian prior (spec nfpi.md).

    Args:
        flow: a ``Glow`` (or a partial called with ``image_shape``).
        image_shape, num_classes: from the data config.
        dequant_eval: ``random`` (original: uniform noise also at eval) or ``midpoint`` (u = 0.5).
        identity_diag: prior variances fixed to 1 (the mean-only configs).
        fpi: ``nf_kld`` (the FPI), ``moments`` (μ = m, v = s; the λ = 0 baseline) or
            ``data_init`` (keep the Gaussians of the data init).
        fpi_epochs: epochs after which the prior_fit pass runs; ``fpi_every_n_epochs`` > 0 also
            runs it every n epochs while an update interval is active.
        lambda_fpi_mu, lambda_fpi_sigma: repulsion strengths (normalised by k(k−1)).
        interval_mu, interval_sigma: [start, end) epochs in which μ / v update; null = off.
        fpi_variant: ``code`` | ``derived`` (spec §11). exp_den_update: kernel choice (§6).
        isotropic_var_for_mean: use the mean variance in the μ update (CIFAR-10 configs).
        prior_fit_augment: gather the prior-fit latents with training augmentations (original).
        init_images: images for the data-dependent init (1024).
        init_flow_from: checkpoint of an NFPI run (the ImageNet32 pre-training) whose raw flow
            weights replace the data-initialised ones before the Gaussians are fitted, as the
            release's ``nf_weights_load_path``; keys and shapes must match this flow.
        ema_decay, ema_power, ema_start_epoch: ema-pytorch schedule min(β, 1 − (1+t)^−p),
            updated every step from ``ema_start_epoch``; None disables the EMA.
        final_grid_temperatures: at the end of training, save ``images/final_samples_T<T>.png``
            (8 samples per class, one row per class, at most 10 classes) for each T.
    """

    def __init__(
        self,
        flow: Glow | Any,
        image_shape: Sequence[int],
        num_classes: int,
        dequant_eval: str = "random",
        identity_diag: bool = False,
        init_var: float = 0.75,
        fpi: str = "nf_kld",
        fpi_epochs: Sequence[int] = (0,),
        fpi_every_n_epochs: int = 0,
        lambda_fpi_mu: float = 0.0,
        lambda_fpi_sigma: float = 0.0,
        interval_mu: Sequence[int] | None = (0, 200),
        interval_sigma: Sequence[int] | None = (0, 200),
        fpi_variant: str = "code",
        exp_den_update: int = 1,
        isotropic_var_for_mean: bool = False,
        fpi_tol: float = 0.1,
        fpi_max_iter: int = 1000,
        prior_fit_augment: bool = True,
        prior_fit_max_batches: int | None = None,
        init_images: int = 1024,
        init_flow_from: str | None = None,
        ema_decay: float | None = 0.9999,
        ema_power: float = 0.75,
        ema_start_epoch: int = 1,
        final_grid_temperatures: Sequence[float] | None = (
            0.1,
            0.2,
            0.3,
            0.4,
            0.5,
            0.6,
            0.7,
            0.8,
            0.9,
            1.0,
        ),
        optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
        scheduler_interval: str = "step",
    ) -> None:
        super().__init__(optimizer, scheduler, scheduler_interval)
        self.save_hyperparameters(logger=False, ignore=["flow", "optimizer", "scheduler"])
        if not num_classes or num_classes < 1:
            raise LatentzooError("NFPI is class-conditional: the data must have num_classes >= 1")
        if dequant_eval not in ("random", "midpoint"):
            raise ValueError(f"dequant_eval must be 'random' or 'midpoint', got '{dequant_eval}'")
        if fpi not in FPI_METHODS:
            raise ValueError(f"fpi must be one of {FPI_METHODS}, got '{fpi}'")
        if fpi_variant not in ("code", "derived"):
            raise ValueError(f"fpi_variant must be 'code' or 'derived', got '{fpi_variant}'")
        self.image_shape = tuple(int(c) for c in image_shape)
        self.num_classes = int(num_classes)
        self.dims = math.prod(self.image_shape)
        self.flow = flow if isinstance(flow, nn.Module) else flow(image_shape=self.image_shape)
        self.dequant_eval = dequant_eval
        self.identity_diag = identity_diag
        self.fpi_epochs = {int(e) for e in fpi_epochs or ()}
        var0 = 1.0 if identity_diag else init_var
        self.register_buffer("prior_mu", torch.zeros(self.num_classes, self.dims))
        self.register_buffer("prior_var", torch.full((self.num_classes, self.dims), var0))
        self.register_buffer("prior_initialized", torch.tensor(False))
        self.ema = EMA(self.flow, ema_decay, power=ema_power) if ema_decay is not None else None
        self._ema_step = -1
        log.info(
            f"NFPI: flow with {sum(p.numel() for p in self.flow.parameters()) / 1e6:.2f}M "
            f"parameters, {self.num_classes} classes, D = {self.dims}"
        )

    # ------------------------------------------------------------ pre/post-processing (§3)
    def preprocess(self, x: torch.Tensor, midpoint: bool | None = None) -> torch.Tensor:
        """Images in [0, 1] (8-bit) -> dequantised y = 2·(255x + u)/256 − 1 in [-1, 1).

        255x is not rounded (as the release): the MNIST recipe's U(0, 0.05) pixel noise and
        values above 1 must reach the flow."""
        if midpoint is None:
            midpoint = not self.training and self.dequant_eval == "midpoint"
        u = torch.full_like(x, 0.5) if midpoint else torch.rand_like(x)
        return 2 * (x * 255 + u) / 256 - 1

    @staticmethod
    def postprocess(y: torch.Tensor) -> torch.Tensor:
        """y in [-1, 1) -> 8-bit images in [0, 1]."""
        return torch.floor(256 * (y + 1) / 2).clamp(0, 255) / 255

    # ------------------------------------------------------------ prior and likelihood (§5)
    def class_log_likelihoods(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """log N(z; μ_c, diag v_c): for the labels ``y`` (B,), or for every class (B, C).

        (z − μ)²/v is formed directly, one class at a time: expanding it into matmuls loses
        float32 precision when some variances are tiny (constant border pixels)."""
        z = z.flatten(1).float()
        const = torch.log(self.prior_var).sum(1) + self.dims * math.log(2 * math.pi)
        if y is not None:
            y = y.long().to(z.device)
            quad = ((z - self.prior_mu[y]) ** 2 / self.prior_var[y]).sum(1)
            return -0.5 * (quad + const[y])
        pairs = zip(self.prior_mu, self.prior_var, strict=True)
        quad = torch.stack([((z - mu) ** 2 / var).sum(1) for mu, var in pairs], 1)
        return -0.5 * (quad + const)

    def _nll(
        self, x: torch.Tensor, y: torch.Tensor | None, flow: nn.Module
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-image NLL in nats under ``flow``: (conditional on y, or marginal if y is None;
        marginal). The marginal carries no gradient when ``y`` is given (it is only logged)."""
        z, logdet = flow(self.preprocess(x))
        shift = logdet - self.dims * math.log(128)
        with torch.no_grad() if y is not None else nullcontext():
            per_class = self.class_log_likelihoods(z)
            marginal = torch.logsumexp(per_class, 1) - math.log(self.num_classes) + shift
        if y is None:
            return -marginal, -marginal
        return -(self.class_log_likelihoods(z, y) + shift), -marginal

    @torch.no_grad()
    def log_prob(
        self, x: torch.Tensor, y: torch.Tensor | None = None, num_samples: int = 1
    ) -> torch.Tensor:
        """log p(x) in nats per image (class-marginal when ``y`` is None). ``num_samples`` > 1
        averages p over that many dequantisation draws (a tighter bound, log-mean-exp)."""
        with self._eval_weights() as flow:
            draws = torch.stack([-self._nll(x, y, flow)[0] for _ in range(max(1, num_samples))])
        return torch.logsumexp(draws, 0) - math.log(draws.shape[0])

    def bpd(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Bits per dimension per image (conditional with ``y``, marginal without)."""
        return -self.log_prob(x, y) / (self.dims * math.log(2))

    def step(self, batch: Any, stage: str) -> dict[str, torch.Tensor]:
        x, y = batch[0], batch[1]
        if stage == "train":
            cond, marginal = self._nll(x, y, self.flow)
        else:  # validation and test score the EMA weights, as eval.py does
            with self._eval_weights() as flow:
                cond, marginal = self._nll(x, y, flow)
        scale = self.dims * math.log(2)
        loss = cond.mean() / scale
        return {
            "loss": loss,
            "bpd": loss.detach(),
            "bpd_marginal": marginal.mean().detach() / scale,
        }

    # ------------------------------------------------------------ classification, sampling (§8)
    @torch.no_grad()
    def class_scores(self, x: torch.Tensor) -> torch.Tensor:
        """log N(f(x); μ_c, v_c) per class (B, C); the log-det does not depend on c."""
        with self._eval_weights() as flow:
            z, _ = flow(self.preprocess(x))
            return self.class_log_likelihoods(z)

    @torch.no_grad()
    def classify(self, x: torch.Tensor) -> torch.Tensor:
        return self.class_scores(x).argmax(1)

    @torch.no_grad()
    def sample(
        self, n: int, labels: torch.Tensor | None = None, temperature: float = 1.0
    ) -> torch.Tensor:
        """``n`` images in [0, 1]: z ~ N(μ_c, (T·√v_c)²), x = postprocess(f⁻¹(z)). Labels default
        to class-balanced ``arange(n) % num_classes``."""
        y = labels if labels is not None else torch.arange(n) % self.num_classes
        y = y.long().to(self.prior_mu.device)
        std = self.prior_var[y].sqrt() * temperature
        z = (self.prior_mu[y] + std * torch.randn_like(std)).view(n, *self.image_shape)
        with self._eval_weights() as flow:
            return self.postprocess(flow.inverse(z))

    # ------------------------------------------------------------ EMA
    def ema_source(self) -> nn.Module:
        return self.flow

    @contextmanager
    def _eval_weights(self) -> Iterator[nn.Module]:
        """The flow to evaluate with, in eval mode: the EMA once it has been updated, else the
        raw flow. Nothing is swapped, so a checkpoint written meanwhile holds the raw weights."""
        if self.ema is not None and self.ema.num_updates > 0:
            yield self.ema.to(self.prior_mu.device).module
            return
        was_training = self.flow.training
        self.flow.eval()
        try:
            yield self.flow
        finally:
            self.flow.train(was_training)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        # EMA at once after the step: checkpoints written in on_train_batch_end include it
        super().optimizer_step(*args, **kwargs)
        start = self.hparams.ema_start_epoch
        if (
            self.ema is not None
            and self.current_epoch >= start
            and self.global_step != self._ema_step
        ):
            self._ema_step = self.global_step
            self.ema.update(self.flow)

    def on_fit_end(self) -> None:
        temps = self.hparams.final_grid_temperatures
        if not temps or not self.trainer.is_global_zero:
            return
        from pathlib import Path

        from torchvision.utils import save_image

        folder = Path(self.trainer.default_root_dir, "images")
        folder.mkdir(parents=True, exist_ok=True)
        labels = torch.arange(min(self.num_classes, 10)).repeat_interleave(8)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            for t in temps:
                images = self.sample(len(labels), labels=labels, temperature=float(t))
                save_image(images, folder / f"final_samples_T{float(t):g}.png", nrow=8)
        log.info(f"NFPI: sample grids at T = {list(temps)} written to {folder}")

    # ------------------------------------------------------------ data init and prior fit (§5-7)
    def on_fit_start(self) -> None:
        if self.ema is not None:
            self.ema.to(self.device)
        if bool(self.prior_initialized):  # resumed
            return
        datamodule = self.trainer.datamodule
        images, seen = [], 0
        for x, _ in datamodule.train_dataloader():
            images.append(x)
            seen += len(x)
            if seen >= self.hparams.init_images:
                break
        x = torch.cat(images)[: self.hparams.init_images].to(self.device)
        self.flow.data_init(self.preprocess(x))
        if self.hparams.get("init_flow_from"):
            self.load_flow_weights(self.hparams.init_flow_from)
        # every rank ran the init on its own images: rank 0's values win
        self._broadcast([t for t in self.flow.state_dict().values() if t.is_floating_point()])
        if self.ema is not None:  # the average starts at the data-initialised flow
            self.ema.reset(self.flow)
        log.info(f"NFPI: data init of the flow on {len(x)} images")
        m, s = self.gather_moments()
        self.prior_mu.copy_(m.float())
        self.prior_var.copy_(torch.ones_like(s).float() if self.identity_diag else s.float())
        self.prior_initialized.fill_(True)
        self._log_prior({}, to_logger=False)  # Lightning allows no self.log in on_fit_start

    def load_flow_weights(self, path: str) -> None:
        """Copy the raw flow weights (``flow.*``, not the EMA) of an NFPI checkpoint."""
        from pathlib import Path

        if not Path(path).is_file():
            raise LatentzooError(
                f"model.init_flow_from={path}: no such checkpoint; pre-train with "
                "experiment=nfpi_imagenet32 and pass its .ckpt"
            )
        state = torch.load(path, map_location=self.device, weights_only=False)
        state = state.get("state_dict", state)
        flow = {k[len("flow.") :]: v for k, v in state.items() if k.startswith("flow.")}
        own = self.flow.state_dict()
        missing = sorted(set(own) - set(flow))
        bad = sorted(k for k in set(own) & set(flow) if own[k].shape != flow[k].shape)
        if missing or bad or len(flow) != len(own):
            extra = sorted(set(flow) - set(own))
            raise LatentzooError(
                f"model.init_flow_from={path}: its flow does not match this one (missing "
                f"{missing[:3]}, unexpected {extra[:3]}, other shapes {bad[:3]}); use the same "
                "model.flow settings (attention included) as the pre-training"
            )
        self.flow.load_state_dict(flow)
        log.info(f"NFPI: flow weights loaded from {path}")

    def on_train_epoch_end(self) -> None:
        epoch = self.current_epoch
        every = self.hparams.fpi_every_n_epochs
        periodic = (
            every > 0
            and epoch % every == 0
            and (_in(self.hparams.interval_mu, epoch) or _in(self.hparams.interval_sigma, epoch))
        )
        if epoch in self.fpi_epochs or periodic:
            self.fit_prior(epoch)

    @torch.no_grad()
    def gather_moments(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Class mean m and per-dimension variance s of z over the training data ("prior_fit"
        pass; with training augmentations unless ``prior_fit_augment`` is false), float64.
        Labelled datamodules choose the images (``data.prior_fit_items_per_class``: the training
        subset by default, as the release configs)."""
        datamodule = self.trainer.datamodule
        augment = self.hparams.prior_fit_augment
        if hasattr(datamodule, "prior_fit_dataloader"):  # the set the release fits on (data docs)
            loader = datamodule.prior_fit_dataloader(augment, batch_size=datamodule.batch_size)
        elif augment:
            loader = datamodule.train_dataloader()
        else:
            loader = datamodule.reference_dataloader("train", batch_size=datamodule.batch_size)
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        k, d = self.num_classes, self.dims
        count = torch.zeros(k, dtype=torch.float64, device=self.device)
        total = torch.zeros(k, d, dtype=torch.float64, device=self.device)
        total_sq = torch.zeros(k, d, dtype=torch.float64, device=self.device)
        was_training = self.flow.training
        self.flow.eval()
        limit = self.hparams.prior_fit_max_batches
        num = len(loader) if limit is None else min(limit, len(loader))
        try:
            for i, (x, y) in enumerate(loader):
                if limit is not None and i >= limit:
                    break
                if i % world != rank:  # under DDP each rank takes every world-th batch
                    continue
                z, _ = self.flow(self.preprocess(x.to(self.device), midpoint=False))
                z, y = z.flatten(1).double(), y.to(self.device).long()
                count.index_add_(0, y, torch.ones_like(y, dtype=torch.float64))
                total.index_add_(0, y, z)
                total_sq.index_add_(0, y, z**2)
                if rank == 0 and (i + 1) % max(1, num // 10) == 0:
                    log.info(f"NFPI prior_fit: {i + 1}/{num} batches")
        finally:
            self.flow.train(was_training)
        if world > 1:
            for t in (count, total, total_sq):
                dist.all_reduce(t)
        if (count == 0).any():
            missing = (count == 0).nonzero().flatten().tolist()[:10]
            raise LatentzooError(f"NFPI prior_fit: no training images of classes {missing}")
        m = total / count[:, None]
        s = (total_sq / count[:, None] - m**2).clamp_min(1e-6)
        return m, s

    @torch.no_grad()
    def fit_prior(self, epoch: int) -> dict[str, float]:
        """The FPI hook: gather latents, update the Gaussians (rank 0), broadcast them."""
        hp = self.hparams
        log.info(f"NFPI: fitting the class Gaussians after epoch {epoch} (fpi={hp.fpi})")
        m, s = self.gather_moments()
        info: dict[str, float] = {}
        if hp.fpi == "moments":
            self.prior_mu.copy_(m.float())
            self.prior_var.copy_(torch.ones_like(s).float() if self.identity_diag else s.float())
        elif hp.fpi == "nf_kld":
            update_mu, update_sigma = _in(hp.interval_mu, epoch), _in(hp.interval_sigma, epoch)
            update_sigma = update_sigma and not self.identity_diag
            if update_mu or update_sigma:
                mu, v, info = fixed_point_iteration(
                    m,
                    s,
                    self.prior_mu.double(),
                    self.prior_var.double(),
                    hp.lambda_fpi_mu,
                    hp.lambda_fpi_sigma,
                    update_mu,
                    update_sigma,
                    hp.fpi_variant,
                    hp.exp_den_update,
                    hp.isotropic_var_for_mean,
                    hp.fpi_tol,
                    hp.fpi_tol,
                    hp.fpi_max_iter,
                )
                self.prior_mu.copy_(mu.float())
                self.prior_var.copy_(v.float())
        self._broadcast([self.prior_mu, self.prior_var])
        self._log_prior(info)
        return info

    def _log_prior(self, info: dict[str, float], to_logger: bool = True) -> None:
        stats = {
            **{f"fpi_{k}": v for k, v in info.items()},
            **kl_summary(self.prior_mu, self.prior_var),
        }
        log.info("NFPI prior: " + ", ".join(f"{k}={v:.4g}" for k, v in stats.items()))
        for name, value in stats.items() if to_logger else ():
            self.log(f"prior/{name}", value, rank_zero_only=True)

    def _broadcast(self, tensors: list[torch.Tensor]) -> None:
        if dist.is_initialized() and dist.get_world_size() > 1:
            for t in tensors:
                dist.broadcast(t, src=0)
