"""Latent Flow Matching (Dao, Phung, Nguyen, Tran, "Flow Matching in Latent Space", 2023).

arXiv 2307.08698; reference code VinAIResearch/LFM.

A frozen first stage E/D maps images in [-1, 1] to latents; a velocity net v_θ(x, t, y) (DiT or
ADM UNet) is trained by conditional flow matching on the straight path between noise and the
scaled latent z = scale_factor · (μ + σ·ε') (a posterior *sample*, as LFM does):

    t ~ U(0, 1),  ε ~ N(0, I),  x_t = (1 − (1 − σ_min)·t)·ε + t·z,  u_t = z − (1 − σ_min)·ε
    loss = mean over all elements of (v_θ(x_t, t, y) − u_t)²

**Time convention: t = 0 is noise, t = 1 is data** (latentzoo/Lipman et al.; LFM's code uses the
reverse, see ``samplers.convert_lfm``; ``time_convention: lfm`` trains/samples a net in LFM's
convention). Sampling integrates the ODE from t = 0 to 1 with the EMA weights (``samplers.solve``)
and decodes. Classifier-free guidance: labels are replaced by the null label (index
``num_classes``) with probability ``label_dropout``; v = v_u + s·(v_c − v_u) at sampling.

Batches are ``{"latent", "label"}`` dicts from the latent cache (``data=latents``; already
scaled; the paper experiments train this way) or ``(images in [0, 1], labels)`` encoded online,
which runs the frozen first stage in fp32 at every step (for small data and smoke runs).
Capability: ``sample(n)``.

Precision: the first stage always runs in fp32 (autocast off); the velocity net runs in the
trainer's precision, and in ``sample`` under the caller's autocast (bf16 FID sampling), while the
ODE state stays fp32. Checkpoints leave out the frozen first stage when its config rebuilds it
(``FirstStage.rebuilt_from_config``) and record its fingerprint, checked on load.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from latentzoo.models.autoencoders.base import FirstStage
from latentzoo.models.base import LatentModel, OptimizerFactory, SchedulerFactory, eval_mode
from latentzoo.models.ema import EMA, EMACheckpoint
from latentzoo.models.samplers import SAMPLER_KEYS, StraightPath, convert_lfm, guided_field, solve
from latentzoo.utils.errors import CheckpointError, LatentzooError

log = logging.getLogger(__name__)

FIRST_STAGE = "first_stage."  # state_dict prefix of the frozen first stage


def warmup_cosine_schedule(
    optimizer: torch.optim.Optimizer,
    warmup_steps: int = 0,
    total_steps: int | None = None,
    min_lr_ratio: float = 0.0,
    min_lr: float | None = None,
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup over ``warmup_steps``, then cosine decay to ``min_lr_ratio``·lr at
    ``total_steps`` (``None`` or ≤ 0: constant after warmup, LFM's setting for most runs).

    ``min_lr`` (absolute) replaces ``min_lr_ratio``. With ``scheduler_interval: epoch``,
    ``total_steps: <epochs>`` and ``min_lr: 1e-5`` this is LFM's ``CosineAnnealingLR(T_max =
    epochs, eta_min = 1e-5)`` stepped once per epoch.
    """
    if min_lr is not None:
        min_lr_ratio = min_lr / optimizer.param_groups[0]["lr"]

    def factor(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        if not total_steps or total_steps <= 0:
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


CPU_PARAMS_WARN_M = 50  # nets above this many million parameters get a warning on the CPU


class LatentFlowMatching(EMACheckpoint, LatentModel):
    """Conditional flow matching on the latents of a frozen autoencoder.

    Args:
        backbone: velocity net, or a partial called with ``in_channels``, ``input_size``,
            ``num_classes`` and ``class_dropout`` (derived here from the first stage and data).
        autoencoder: frozen first stage (``models/autoencoders``).
        image_shape: [C, H, W] of the data images.
        num_classes: label count; 0/None = unconditional.
        label_dropout: probability of replacing a label by the null label (CFG training).
        cfg_scale: default guidance scale s for ``sample``.
        null_class: build the null label row (default: ``label_dropout > 0``).
        allow_untrained_guidance: permit s ≠ 1 although the null label was never trained.
        sigma_min: noise floor of the path at the data end.
        posterior: "sample" (LFM) or "mean" of the first-stage posterior.
        t_sampling: "uniform" (LFM) or "logit_normal".
        time_convention: "latentzoo" (t = 0 noise) or "lfm" (t = 0 data; for LFM checkpoints).
        ema_decay: EMA decay (None = no EMA; sampling then uses the raw weights).
        ema_warmup: ramp the decay up as min(decay, (1+n)/(10+n)) (for short runs).
        sampler: default solver settings {name, steps, rtol, atol}; missing ones take
            ``samplers.solve``'s defaults (dopri5, rtol = atol = 1e-5).
    """

    def __init__(
        self,
        backbone: nn.Module | Callable[..., nn.Module],
        autoencoder: FirstStage,
        image_shape: list[int] | tuple[int, ...],
        num_classes: int | None = 0,
        label_dropout: float = 0.0,
        cfg_scale: float = 1.0,
        null_class: bool | None = None,
        allow_untrained_guidance: bool = False,
        sigma_min: float = 1e-5,
        posterior: str = "sample",
        t_sampling: str = "uniform",
        time_convention: str = "latentzoo",
        ema_decay: float | None = 0.9999,
        ema_warmup: bool = False,
        sampler: dict[str, Any] | None = None,
        optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
        scheduler_interval: str = "step",
    ) -> None:
        super().__init__(optimizer, scheduler, scheduler_interval)
        self.save_hyperparameters(
            logger=False, ignore=["backbone", "autoencoder", "optimizer", "scheduler"]
        )
        if posterior not in ("sample", "mean"):
            raise ValueError(f"posterior must be 'sample' or 'mean', got '{posterior}'")
        if t_sampling not in ("uniform", "logit_normal"):
            raise ValueError(f"t_sampling must be 'uniform' or 'logit_normal', got '{t_sampling}'")
        if time_convention not in ("latentzoo", "lfm"):
            raise ValueError(
                f"time_convention must be 'latentzoo' or 'lfm', got '{time_convention}'"
            )
        self.first_stage = autoencoder.freeze()
        self.image_shape = list(image_shape)
        self.latent_shape = self.first_stage.latent_shape(self.image_shape)
        self.num_classes = int(num_classes or 0)
        self.label_dropout = float(label_dropout) if self.num_classes else 0.0
        has_null = bool(self.num_classes) and (
            self.label_dropout > 0 if null_class is None else null_class
        )
        self.null_label: int | None = self.num_classes if has_null else None
        if self.label_dropout > 0 and not has_null:
            raise ValueError("label_dropout > 0 needs the null class (null_class: true)")
        self.cfg_scale = float(cfg_scale)
        self.allow_untrained_guidance = allow_untrained_guidance
        self.posterior, self.t_sampling = posterior, t_sampling
        self.time_convention = time_convention
        self.path = StraightPath(sigma_min)
        self.sampler = dict(sampler or {})
        if set(self.sampler) - set(SAMPLER_KEYS):
            raise LatentzooError(
                f"model.sampler has unknown keys {sorted(set(self.sampler) - set(SAMPLER_KEYS))}; "
                f"known: {', '.join(SAMPLER_KEYS)}"
            )
        if isinstance(backbone, nn.Module):
            self.net = backbone
        else:  # a Hydra partial: the shapes come from the first stage and the data
            self.net = backbone(
                in_channels=self.latent_shape[0],
                input_size=self.latent_shape[1],
                num_classes=self.num_classes,
                class_dropout=1.0 if has_null else 0.0,
            )
        log.info(
            f"LatentFlowMatching: {type(self.net).__name__} with "
            f"{sum(p.numel() for p in self.net.parameters()) / 1e6:.2f}M parameters on "
            f"{self.latent_shape} latents of {self.first_stage.name}"
        )
        self.ema = EMA(self.net, ema_decay, ema_warmup) if ema_decay is not None else None
        self._ema_step = -1
        self._checked_latent_std = False
        self.last_nfe = 0
        self.last_net_forwards = 0

    # ------------------------------------------------------------------ first stage
    def _fp32(self):
        return torch.autocast(self.device.type, enabled=False)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] -> scaled latents (a posterior sample, or its mean)."""
        with self._fp32():
            mean, std = self.first_stage.encode(images.float() * 2 - 1)
        z = mean if self.posterior == "mean" else mean + std * torch.randn_like(std)
        return z * self.first_stage.scale_factor

    @torch.no_grad()
    def decode_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> images in [0, 1]."""
        with self._fp32():
            x = self.first_stage.decode(z.float() / self.first_stage.scale_factor)
        return ((x.clamp(-1, 1) + 1) / 2).float()

    # ------------------------------------------------------------------ velocity and loss
    def velocity(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None, net: nn.Module | None = None
    ) -> torch.Tensor:
        """v(x, t, y) of ``net`` (default: the raw net) in latentzoo's convention, whatever
        convention the net was trained in."""
        net = self.net if net is None else net
        return (convert_lfm(net) if self.time_convention == "lfm" else net)(x, t, y)

    def _labels(self, y: torch.Tensor | None, batch: int, train: bool) -> torch.Tensor | None:
        if not self.num_classes:
            return None
        if y is None:
            raise LatentzooError("this model is class-conditional but the batch has no labels")
        y = y.long().to(self.device)
        if train and self.label_dropout > 0:
            drop = torch.rand(batch, device=self.device) < self.label_dropout
            y = torch.where(drop, torch.full_like(y, self.null_label), y)
        return y

    def sample_t(self, n: int) -> torch.Tensor:
        if self.t_sampling == "logit_normal":
            return torch.sigmoid(torch.randn(n, device=self.device))
        return torch.rand(n, device=self.device)

    def step(self, batch: Any, stage: str) -> dict[str, torch.Tensor]:
        if isinstance(batch, dict):  # from the latent cache: already scaled
            z, y = batch["latent"].float(), batch.get("label")
        else:  # images in [0, 1], encoded online by the fp32 first stage
            images, y = (batch[0], batch[1]) if isinstance(batch, list | tuple) else (batch, None)
            z = self.encode_images(images)
        z = z.to(self.dtype)  # the first stage runs in fp32; the net in the trainer's precision
        if stage == "train" and not self._checked_latent_std:
            self._check_latent_std(z)
        y = self._labels(y, z.shape[0], train=stage == "train")
        t = self.sample_t(z.shape[0])
        xt, ut = self.path.sample(z, torch.randn_like(z), t)
        v = self.velocity(xt, t, y)
        loss = (v.float() - ut).pow(2).mean()
        return {"loss": loss}

    def _check_latent_std(self, z: torch.Tensor) -> None:
        self._checked_latent_std = True
        std = float(z.float().std())
        log.info(f"scaled latent std on the first batch: {std:.3f}")
        if not 0.7 <= std <= 1.4 and self.first_stage.name != "identity":
            log.warning(
                f"scaled latent std is {std:.3f}, outside [0.7, 1.4]: the autoencoder's "
                f"scale_factor ({self.first_stage.scale_factor}) may not fit this data"
            )

    def optimizer_params(self) -> Any:
        # only the velocity net trains; the frozen first stage stays out of the optimizer
        return self.net.parameters()

    def compiled_modules(self) -> dict[str, nn.Module]:
        # model.compile: the velocity net (DiT / ADM UNet); the frozen first stage is called
        # through encode/decode, not forward, and the EMA copy only samples
        return {"net": self.net}

    # ------------------------------------------------------------------ EMA and checkpoints
    def on_fit_start(self) -> None:
        if self.ema is not None:
            self.ema.to(self.device)
        millions = sum(p.numel() for p in self.net.parameters()) / 1e6
        if self.device.type == "cpu" and millions > CPU_PARAMS_WARN_M:
            log.warning(
                f"training a {millions:.0f}M-parameter {type(self.net).__name__} on the CPU: "
                "each step takes minutes (the paper's DiT-L/2 is sized for GPUs); for a CPU try "
                "pass model/backbone=dit_tiny (or unet_tiny)"
            )
        datamodule = getattr(self.trainer, "datamodule", None)
        if hasattr(datamodule, "check_autoencoder"):
            datamodule.check_autoencoder(self.first_stage)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        # the EMA follows every optimizer step at once (not in on_train_batch_end, which runs
        # after the callbacks', so a step-cadence checkpoint would hold an EMA one update behind
        # its weights and a resumed run would lose that update)
        super().optimizer_step(*args, **kwargs)
        if self.ema is not None and self.global_step != self._ema_step:
            self._ema_step = self.global_step
            self.ema.update(self.net)

    def ema_source(self) -> nn.Module:
        return self.net

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)  # the EMA entry
        checkpoint["latent_fm"] = {
            "num_classes": self.num_classes,
            "null_label": self.null_label,
            "label_dropout": self.label_dropout,
            "time_convention": self.time_convention,
            "latent_shape": self.latent_shape,
            "first_stage": self.first_stage.describe(),  # checked on load when not stored
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        meta = checkpoint.get("latent_fm", {})
        for key in ("num_classes", "null_label", "latent_shape"):
            if key in meta and meta[key] != getattr(self, key):
                raise CheckpointError(
                    f"checkpoint has {key}={meta[key]} but the model was built with "
                    f"{getattr(self, key)}; rebuild from the checkpoint's config"
                )
        stored = _has_first_stage(checkpoint.get("state_dict", {}))
        if isinstance(meta.get("first_stage"), dict) and not stored:
            self._check_first_stage(meta["first_stage"])
        if meta:
            self.label_dropout = meta.get("label_dropout", self.label_dropout)
        super().on_load_checkpoint(checkpoint)  # the EMA, applied once the raw weights are in

    def _check_first_stage(self, saved: dict[str, Any]) -> None:
        """Refuse a rebuilt first stage that is not the one the checkpoint was trained on."""
        live = self.first_stage.describe()
        same = (
            saved.get("class") == live["class"]
            and math.isclose(saved.get("scale_factor", math.nan), live["scale_factor"])
            and math.isclose(saved.get("fingerprint", math.nan), live["fingerprint"], rel_tol=1e-6)
        )
        if not same:
            raise CheckpointError(
                f"the checkpoint was trained on first stage {saved.get('name')} "
                f"({saved.get('class')}, scale {saved.get('scale_factor')}, fingerprint "
                f"{saved.get('fingerprint')}) but "
                f"model.autoencoder builds {live['name']} ({live['class']}, scale "
                f"{live['scale_factor']}, fingerprint {live['fingerprint']}); point "
                "model.autoencoder at the same weights"
            )

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """Leaves out the frozen first stage when its config rebuilds it (lean checkpoints)."""
        state = super().state_dict(*args, **kwargs)
        if self.first_stage.rebuilt_from_config:
            prefix = kwargs.get("prefix", "") + FIRST_STAGE
            for key in [k for k in state if k.startswith(prefix)]:
                del state[key]
        return state

    def load_state_dict(
        self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False
    ) -> Any:
        """A lean state_dict gets the live first stage's weights (checked against the
        checkpoint's fingerprint in ``on_load_checkpoint``); older checkpoints hold them."""
        if not _has_first_stage(state_dict):
            merged = OrderedDict(state_dict)
            merged.update((FIRST_STAGE + k, v) for k, v in self.first_stage.state_dict().items())
            if hasattr(state_dict, "_metadata"):
                merged._metadata = state_dict._metadata  # type: ignore[attr-defined]
            state_dict = merged
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample(
        self,
        n: int,
        labels: torch.Tensor | None = None,
        sampler: str | None = None,
        steps: int | None = None,
        cfg_scale: float | None = None,
        noise: torch.Tensor | None = None,
        return_latents: bool = False,
    ) -> torch.Tensor:
        """``n`` images in [0, 1] (B, C, H, W, fp32) on the model device, from the EMA weights
        (the raw ones without EMA).

        Labels default to class-balanced ``arange(n) % num_classes``. The net runs under the
        caller's autocast; the ODE state and the decode stay fp32. Sets ``last_nfe`` (calls of
        the guided field; a CFG pair is one doubled-batch forward, 1 NFE) and
        ``last_net_forwards`` (per-sample net evaluations: 2·NFE with CFG).
        """
        scale = self.cfg_scale if cfg_scale is None else float(cfg_scale)
        y = None
        if self.num_classes:
            y = labels if labels is not None else torch.arange(n) % self.num_classes
            y = y.long().to(self.device)
        guided = scale != 1.0 and y is not None
        if guided:
            self._check_guidance(scale)
        if noise is None:
            noise = torch.randn(n, *self.latent_shape, device=self.device)
        x0 = noise.to(self.device, torch.float32)
        net = self.ema.to(self.device).module if self.ema is not None else self.net

        def velocity(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
            return self.velocity(x, t, y, net=net).float()  # the ODE state stays fp32

        settings = dict(self.sampler)  # what is not set takes solve()'s defaults
        settings.update({k: v for k, v in (("name", sampler), ("steps", steps)) if v is not None})
        if "name" in settings:
            settings["method"] = settings.pop("name")
        with eval_mode(net):
            z, nfe = solve(guided_field(velocity, y, self.null_label, scale), x0, **settings)
        self.last_nfe, self.last_net_forwards = nfe, nfe * (2 if guided else 1)
        return z if return_latents else self.decode_latents(z)

    def _check_guidance(self, scale: float) -> None:
        if self.null_label is None:
            raise LatentzooError(
                f"cfg_scale={scale} needs a null label, but this model has none "
                "(trained with label_dropout 0); use cfg_scale=1"
            )
        if self.label_dropout == 0 and not self.allow_untrained_guidance:
            raise LatentzooError(
                f"cfg_scale={scale}: the null label was never trained (label_dropout 0); "
                "use cfg_scale=1 or set model.allow_untrained_guidance=true"
            )


def _has_first_stage(state_dict: Mapping[str, Any]) -> bool:
    return any(k.startswith(FIRST_STAGE) for k in state_dict)
