"""Soft-IntroVAE (Daniel & Tamar, "Soft-IntroVAE: Analyzing and Improving the Introspective
Variational Autoencoder", CVPR 2021, arXiv:2012.13253). Spec: ``soft_intro_vae.md``.

A VAE whose encoder E also acts as a discriminator: it raises the ELBO of real images and pushes
down a *soft* exponential of the ELBO of generated images (decoded prior samples x_f = D(z_f))
and of reconstructions (x_r = D(z), z ~ q(z|x)); the decoder D tries to make both look real to E.
Per sample, with s = 1 / (C·H·W), REC(y, ŷ) = Σ_pixels (y − ŷ)² and KL the closed form:

    e(y) = β_rec·REC(y, D(z')) + β_neg·KL(q(·|y))            z' ~ q(·|y), y ∈ {x_r, x_f}
    L_E  = s·(β_rec·REC(x, x_r) + β_kl·KL(q(·|x))) + ¼·[exp(−2s·e(x_r)) + exp(−2s·e(x_f))]
    L_D  = s·[β_rec·REC(x, x_r) + ½β_kl·(KL(q(·|x_r)) + KL(q(·|x_f)))
             + ½γ_r·β_rec·(REC(x_r, D(z_r')) + REC(x_f, D(z_f')))]     (batch means throughout)

Each batch is one iteration: z_f ~ N(0, I) is drawn once, E steps on L_E (D frozen), then D steps
on L_D (E differentiated through but not updated). As in the published code, the reconstruction
*target* x_r in e(x_r) is not detached, so the repulsion also trains E through x_r = D(z(x));
``detach_rec_target=true`` is the ablation. For the first ``num_vae`` epochs both networks train
on the plain VAE loss β_rec·REC + β_kl·KL (no s-scaling).

Lightning runs this with manual optimisation; ``global_step`` counts iterations (the decoder's
step goes through the strategy and does not advance it). Evaluation must use eval-mode BatchNorm
(spec §7: the original's train-mode FID is not comparable); ``sample`` always does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from latentzoo.models.base import (
    LatentModel,
    OptimizerFactory,
    SchedulerFactory,
    eval_mode,
    reparameterize,
)
from latentzoo.models.beta_vae import GaussianVAEMixin, gaussian_kl
from latentzoo.utils.checkpoint_io import resume_advice
from latentzoo.utils.errors import NonFiniteLossError


def squared_error(target: torch.Tensor, prediction: torch.Tensor) -> torch.Tensor:
    """REC: the squared error summed over pixels, one value per sample."""
    return (target - prediction).pow(2).flatten(1).sum(1)


def kl_divergence(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, I)) summed over latent dimensions, one value per sample."""
    return gaussian_kl(mean, logvar).sum(1)


class SoftIntroVAE(GaussianVAEMixin, LatentModel):
    """Soft-IntroVAE image model.

    Capabilities: ``encode`` (posterior mean μ), ``decode`` (D(z) clamped to [0, 1]),
    ``sample`` (prior samples, eval-mode BatchNorm), ``reconstruct``. No ``log_prob``.

    Args:
        encoder: image → 2·latent_dim (μ, log σ²), e.g. ``nets.introvae.IntroEncoder``.
        decoder: latent → image (no output activation), e.g. ``nets.introvae.IntroDecoder``.
        beta_rec, beta_kl, beta_neg: the loss weights (no default for β_neg: the original's
            ``main.py`` default 1.0 contradicts its README's 256).
        gamma_r: weight of the decoder's reconstruct-the-generated term (the original always
            used 1e-8: its ``--gamma_r`` flag was never passed on).
        num_vae: warm-up epochs of plain VAE training.
        detach_rec_target: detach x_r as the target of e(x_r) (ablation; the paper does not).
        skip_nonfinite: skip an optimiser step whose loss is NaN/inf instead of stopping.
        optimizer, decoder_optimizer: Adam partials for E and D (decoder defaults to the same).
        scheduler: an lr scheduler partial applied to both optimisers (stepped per epoch).
        channels, feature_size: the architecture preset the config built the nets from; only
            recorded in the hyper-parameters.
    """

    # Each of the two backward passes of an iteration trains one network with the other frozen
    # (toggle_optimizer): under DDP the frozen one's parameters are unused in that backward.
    ddp_find_unused_parameters = True

    def __init__(
        self,
        encoder: nn.Module,
        decoder: nn.Module,
        latent_dim: int,
        beta_neg: float,
        beta_rec: float = 1.0,
        beta_kl: float = 1.0,
        gamma_r: float = 1e-8,
        num_vae: int = 0,
        detach_rec_target: bool = False,
        skip_nonfinite: bool = False,
        optimizer: OptimizerFactory | None = None,
        decoder_optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
        scheduler_interval: str = "epoch",
        channels: Sequence[int] | None = None,
        feature_size: int | None = None,
    ) -> None:
        super().__init__(
            optimizer=optimizer, scheduler=scheduler, scheduler_interval=scheduler_interval
        )
        if beta_neg <= 0 or beta_rec <= 0 or beta_kl < 0:
            raise ValueError(
                f"need beta_neg > 0, beta_rec > 0, beta_kl >= 0; got beta_neg={beta_neg}, "
                f"beta_rec={beta_rec}, beta_kl={beta_kl}"
            )
        if scheduler_interval not in ("epoch", "step"):
            raise ValueError(f"scheduler_interval must be epoch or step, got {scheduler_interval}")
        self.save_hyperparameters(
            logger=False,
            ignore=["encoder", "decoder", "optimizer", "decoder_optimizer", "scheduler"],
        )
        self.encoder = encoder
        self.decoder = decoder
        self.latent_dim = latent_dim
        self.beta_neg, self.beta_rec, self.beta_kl = beta_neg, beta_rec, beta_kl
        self.gamma_r = gamma_r
        self.num_vae = num_vae
        self.detach_rec_target = detach_rec_target
        self.skip_nonfinite = skip_nonfinite
        self.decoder_optimizer_factory = decoder_optimizer or self.optimizer_factory
        self.automatic_optimization = False  # two optimisers, stepped in training_step

    # --- capabilities (encode / posterior / reconstruct come from GaussianVAEMixin) -----------
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents -> images clamped to [0, 1] (the decoder itself has no output activation)."""
        return self.decoder(z).clamp(0, 1)

    @torch.no_grad()
    def sample(self, n: int) -> torch.Tensor:
        """``n`` images D(z), z ~ N(0, I), clamped to [0, 1]; BatchNorm always uses running
        statistics here, whatever mode the model is in (spec §7)."""
        with eval_mode(self.decoder):
            return self.decode(torch.randn(n, self.latent_dim, device=self.device))

    # --- losses -------------------------------------------------------------------------------
    def vae_terms(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The plain (unscaled) VAE loss β_rec·REC + β_kl·KL: warm-up, validation and test."""
        mean, logvar = self.posterior(x)
        rec = squared_error(x, self.decoder(reparameterize(mean, logvar))).mean()
        kl = kl_divergence(mean, logvar).mean()
        return {"loss": self.beta_rec * rec + self.beta_kl * kl, "rec": rec, "kl": kl}

    def _introspect(self, y: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Encode y, decode a posterior sample: per-sample (REC(target, y'), KL(q(·|y)))."""
        mean, logvar = self.posterior(y)
        return squared_error(target, self.decoder(reparameterize(mean, logvar))), kl_divergence(
            mean, logvar
        )

    def encoder_terms(
        self, x: torch.Tensor, z_fake: torch.Tensor
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """L_E (key ``loss_e``) and monitors; and the real latent sample z (reused by D).

        Call with the decoder frozen (``requires_grad`` off) so that only E gets gradients:
        x_r keeps its graph, so the real term trains E through D.
        """
        s = 1.0 / x[0].numel()
        mean, logvar = self.posterior(x)
        z = reparameterize(mean, logvar)
        x_rec = self.decoder(z)
        with torch.no_grad():
            x_fake = self.decoder(z_fake)  # no path to E
        rec = squared_error(x, x_rec).mean()
        kl = kl_divergence(mean, logvar).mean()
        loss_real = s * (self.beta_rec * rec + self.beta_kl * kl)

        # E sees the generated images as inputs only (detached), but by default x_rec stays
        # the target of its own reconstruction, as in the published code.
        target = x_rec.detach() if self.detach_rec_target else x_rec
        rec_rec, kl_rec = self._introspect(x_rec.detach(), target)
        rec_fake, kl_fake = self._introspect(x_fake, x_fake)
        exp_rec = torch.exp(-2 * s * (self.beta_rec * rec_rec + self.beta_neg * kl_rec)).mean()
        exp_fake = torch.exp(-2 * s * (self.beta_rec * rec_fake + self.beta_neg * kl_fake)).mean()
        loss_fake = 0.25 * (exp_rec + exp_fake)
        terms = {
            "loss_e": loss_real + loss_fake,
            "loss_e_real": loss_real,
            "loss_e_fake": loss_fake,
            "rec": rec,
            "kl": kl,
            "kl_rec": kl_rec.mean(),
            "kl_fake": kl_fake.mean(),
            "rec_rec": rec_rec.mean(),
            "rec_fake": rec_fake.mean(),
            "expelbo_rec": exp_rec,
            "expelbo_fake": exp_fake,
            "diff_kl": kl_fake.mean() - kl,  # should stay >= 0: E keeps fakes off the prior
        }
        return terms, z

    def decoder_terms(
        self, x: torch.Tensor, z: torch.Tensor, z_fake: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """L_D (key ``loss_d``) and monitors. Call with the encoder frozen: gradients flow
        through E into D, but E's parameters get none."""
        s = 1.0 / x[0].numel()
        x_rec = self.decoder(z.detach())
        x_fake = self.decoder(z_fake)
        rec = squared_error(x, x_rec).mean()
        mean_r, logvar_r = self.posterior(x_rec)
        mean_f, logvar_f = self.posterior(x_fake)
        kl_rec = kl_divergence(mean_r, logvar_r).mean()
        kl_fake = kl_divergence(mean_f, logvar_f).mean()
        # the γ_r term: D reconstructs its own outputs from detached posterior samples
        rec_rec = squared_error(
            x_rec.detach(), self.decoder(reparameterize(mean_r, logvar_r).detach())
        ).mean()
        rec_fake = squared_error(
            x_fake.detach(), self.decoder(reparameterize(mean_f, logvar_f).detach())
        ).mean()
        loss = s * (
            self.beta_rec * rec
            + 0.5 * self.beta_kl * (kl_rec + kl_fake)
            + 0.5 * self.gamma_r * self.beta_rec * (rec_rec + rec_fake)
        )
        return {
            "loss_d": loss,
            "d_rec": rec,
            "d_kl_rec": kl_rec,
            "d_kl_fake": kl_fake,
            "d_rec_rec": rec_rec,
            "d_rec_fake": rec_fake,
        }

    def step(self, batch: Any, stage: str) -> dict[str, torch.Tensor]:
        """Validation/test: the plain ELBO terms, no optimisation (``loss`` = β_rec·REC + β_kl·KL
        per image, unscaled, comparable with ``train/loss``)."""
        return self.vae_terms(_images(batch))

    # --- optimisation -------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        opt_e = self.make_optimizer(self.optimizer_factory, self.encoder.parameters())
        opt_d = self.make_optimizer(self.decoder_optimizer_factory, self.decoder.parameters())
        if self.scheduler_factory is None:
            return [opt_e, opt_d]
        return [opt_e, opt_d], [self.scheduler_factory(optimizer=o) for o in (opt_e, opt_d)]

    def _finite(self, loss: torch.Tensor, name: str) -> bool:
        """False (skip the step) or an error when ``loss`` is NaN/inf. One host sync per
        step: the check has to come before the optimiser step to be able to skip it."""
        finite = bool(torch.isfinite(loss))
        if self._trainer is not None:  # under DDP all ranks skip (or step) together
            finite = self.trainer.strategy.reduce_boolean_decision(finite, all=True)
        if finite:
            return True
        if self.skip_nonfinite:
            return False
        raise NonFiniteLossError(
            f"Soft-IntroVAE: {name} became {loss.item()} at step {self.global_step} (epoch "
            f"{self.current_epoch}) with beta_neg={self.beta_neg}. Increase model.beta_neg (a "
            "larger beta_neg weakens the repulsion of generated images; the authors' advice), "
            f"or set model.skip_nonfinite=true to skip such steps. {resume_advice(self._trainer)}"
        )

    def _step(self, optimizer: Any, loss: torch.Tensor, name: str, count: bool) -> bool:
        """zero_grad, backward, step ``optimizer`` (a LightningOptimizer). ``count=False`` steps
        through the strategy so that ``global_step`` advances once per iteration."""
        optimizer.zero_grad()  # grads set to None: a step now leaves the parameters alone
        if not self._finite(loss.detach(), name):
            if count:  # a skipped iteration still counts, else max_steps is never reached
                optimizer.step()
            return False
        self.manual_backward(loss)
        if count:
            optimizer.step()
        else:
            self.trainer.strategy.optimizer_step(optimizer.optimizer, closure=lambda: None)
        return True

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        opt_e, opt_d = self.optimizers()
        x = _images(batch)
        z_fake = torch.randn(len(x), self.latent_dim, device=x.device)  # once per iteration

        if self.current_epoch < self.num_vae:  # warm-up: a plain VAE, both networks step
            terms = self.vae_terms(x)
            opt_d.zero_grad()
            done = self._step(opt_e, terms["loss"], "the VAE warm-up loss", count=True)
            if done:
                self.trainer.strategy.optimizer_step(opt_d.optimizer, closure=lambda: None)
            self._scheduler_step("step")
            return self._log(terms, skipped=not done, batch_size=len(x))

        self.toggle_optimizer(opt_e)  # requires_grad off for D: no decoder gradients at all
        e_terms, z = self.encoder_terms(x, z_fake)
        skipped = not self._step(opt_e, e_terms["loss_e"], "the encoder loss", count=True)
        self.untoggle_optimizer(opt_e)

        self.toggle_optimizer(opt_d)  # and now off for E: gradients pass through it to D
        d_terms = self.decoder_terms(x, z, z_fake)
        skipped |= not self._step(opt_d, d_terms["loss_d"], "the decoder loss", count=False)
        self.untoggle_optimizer(opt_d)
        self._scheduler_step("step")

        real = self.beta_rec * e_terms["rec"] + self.beta_kl * e_terms["kl"]
        terms = {"loss": real.detach(), **e_terms, **d_terms}
        return self._log(terms, skipped, len(x))

    def _log(self, terms: dict[str, torch.Tensor], skipped: bool, batch_size: int) -> torch.Tensor:
        """Log the training terms; ``train/loss`` is the real-data β_rec·REC + β_kl·KL."""
        if self.skip_nonfinite:
            terms["skipped"] = torch.tensor(float(skipped), device=terms["loss"].device)
            if skipped:  # NaN -> 0 in the logs of a skipped step (the base class would stop)
                terms = {k: torch.nan_to_num(v.detach()) for k, v in terms.items()}
        self.log_terms(terms, "train", batch_size)
        return terms["loss"]

    def _scheduler_step(self, interval: str) -> None:
        if self.scheduler_interval != interval:
            return
        schedulers = self.lr_schedulers()
        for scheduler in schedulers if isinstance(schedulers, list) else [schedulers]:
            if scheduler is not None:
                scheduler.step()

    def on_train_epoch_end(self) -> None:
        self._scheduler_step("epoch")


def _images(batch: Any) -> torch.Tensor:
    return batch[0] if isinstance(batch, list | tuple) else batch
