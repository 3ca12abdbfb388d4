"""Shared LightningModule plumbing: optimizer/scheduler from config partials, NaN guard, the
``compile`` option (torch.compile of the networks) and fused Adam/AdamW on CUDA."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any

import lightning as L
import torch
from torch import nn

from latentzoo.utils.checkpoint_io import resume_advice
from latentzoo.utils.errors import LatentzooError, NonFiniteLossError

OptimizerFactory = Callable[..., torch.optim.Optimizer]
SchedulerFactory = Callable[..., torch.optim.lr_scheduler.LRScheduler]


def reparameterize(mean: torch.Tensor, logvar: torch.Tensor, sample: bool = True) -> torch.Tensor:
    """z = μ + σ·ε, ε ~ N(0, I), σ = exp(logvar / 2): a differentiable posterior sample; with
    ``sample=False`` the deterministic code μ (what the originals use in val/test where they
    do: each model passes ``sample`` for its stage, see ``LatentModel.samples_z``)."""
    if not sample:
        return mean
    return mean + torch.randn_like(mean) * (0.5 * logvar).exp()


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """``module`` in eval mode inside the block (dropout off, BatchNorm on running statistics:
    train mode makes samples and FID batch dependent); its previous mode is restored."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


#: ``model.compile`` values: off, or a ``torch.compile`` mode.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
_FUSABLE_OPTIMIZERS = (torch.optim.Adam, torch.optim.AdamW)


def compile_mode(value: Any) -> str | None:
    """The torch.compile mode of a ``model.compile`` value (false/null: None; true: default)."""
    if value is None or value is False or value == "false":
        return None
    if value is True or value == "true":
        return "default"
    if value not in COMPILE_MODES:
        raise LatentzooError(
            f"model.compile={value!r} is not an option: use false, "
            + ", ".join(COMPILE_MODES)
            + " (torch.compile modes)"
        )
    return str(value)


class _CompileOption(type):
    """Metaclass of :class:`LatentModel`: takes the ``compile`` keyword (``model.compile`` in
    every model config) before the model's own ``__init__`` sees it, so every model has the
    option without each signature repeating it; ``save_hyperparameters`` still records exactly
    the model's own arguments (``compile`` is a run setting, like the trainer's precision)."""

    def __call__(cls, *args: Any, compile: Any = False, **kwargs: Any) -> Any:  # noqa: A002
        mode = compile_mode(compile)  # a bad value fails before the model is built
        model = type.__call__(cls, *args, **kwargs)
        model.compile_mode = mode
        return model


class LatentModel(L.LightningModule, metaclass=_CompileOption):
    """Base for latentzoo models.

    Subclasses implement ``step(batch, stage) -> dict`` whose ``"loss"`` is optimised and whose
    other entries are logged as ``<stage>/<name>``. Optimizer and scheduler come from Hydra
    partials (``_partial_: true``) so they can be swapped from the command line.

    ``model.compile`` (``false | default | reduce-overhead | max-autotune``, any model):
    ``torch.compile`` each network of :meth:`compiled_modules` in place (``nn.Module.compile``)
    when the trainer sets the model up, so parameter names, ``state_dict`` and checkpoints are
    those of the eager model, DDP wraps the LightningModule as usual, and manual optimisation
    (FactorVAE, Soft-IntroVAE) is untouched: the networks are compiled, not the step.
    On CUDA, Adam/AdamW from a config partial are built with ``fused=True`` unless the config
    says ``fused``/``foreach`` itself (:meth:`make_optimizer`).
    """

    compile_mode: str | None = None  # set by the metaclass from ``compile``

    def __init__(
        self,
        optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
        scheduler_interval: str = "step",
    ) -> None:
        super().__init__()
        self.optimizer_factory = optimizer or torch.optim.Adam
        self.scheduler_factory = scheduler
        self.scheduler_interval = scheduler_interval
        self._all_finite: torch.Tensor | None = None  # see log_terms

    # Whether val/test losses use a posterior sample (True) or the mean μ (False). Training
    # always samples. Models set it to what their reference implementation does.
    sample_in_eval: bool = True

    def samples_z(self, stage: str) -> bool:
        """Whether ``stage``'s loss uses z = μ + σ·ε (training always; val/test only when the
        model's reference implementation does, ``sample_in_eval``)."""
        return stage == "train" or self.sample_in_eval

    def step(self, batch: Any, stage: str) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _shared_step(self, batch: Any, stage: str) -> torch.Tensor:
        terms = self.step(batch, stage)
        self.log_terms(terms, stage, _batch_size(batch))
        return terms["loss"]

    def log_terms(self, terms: dict[str, torch.Tensor], stage: str, batch_size: int) -> None:
        """Log ``terms`` as ``<stage>/<name>`` and stop training on a non-finite loss.

        In training, both run only on the steps Lightning writes to the loggers
        (``trainer.log_every_n_steps``): each ``self.log`` costs about a millisecond and the
        finiteness check is a host-device sync. A per-step flag that stays on the device
        remembers a non-finite loss in between, so it is still caught, at most
        ``log_every_n_steps`` steps late and before a checkpoint at a logging step is written.
        """
        loss = terms["loss"].detach()
        on_step = stage == "train"  # per-step curves in training, epoch means otherwise
        if on_step:
            finite = torch.isfinite(loss)
            self._all_finite = finite if self._all_finite is None else self._all_finite & finite
            trainer = self._trainer
            if (
                trainer
                and trainer.log_every_n_steps
                and not trainer._logger_connector.should_update_logs
            ):
                return
            all_finite = bool(self._all_finite)
            if trainer and trainer.world_size > 1:  # every rank stops, or none does
                all_finite = trainer.strategy.reduce_boolean_decision(all_finite, all=True)
            if not all_finite:
                raise NonFiniteLossError(
                    f"the loss became non-finite at or before global step {self.global_step} "
                    f"(it is {loss.item()} now); training stopped. {resume_advice(trainer)} "
                    "Lower the learning rate or check the data before resuming."
                )
        for name, value in terms.items():
            self.log(
                f"{stage}/{name}",
                value.detach(),
                prog_bar=name == "loss",
                on_step=on_step,
                on_epoch=not on_step,
                batch_size=batch_size,
                sync_dist=not on_step,
            )

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._shared_step(batch, "train")

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._shared_step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._shared_step(batch, "test")

    # ------------------------------------------------------------------ compile option
    def compiled_modules(self) -> dict[str, nn.Module]:
        """The networks ``model.compile`` compiles: by default every direct child module that
        has parameters (encoder, decoder, discriminator, backbone, ...). Models narrow it (e.g.
        to the trained backbone, leaving a frozen first stage eager)."""
        return {
            name: child
            for name, child in self.named_children()
            if next(child.parameters(), None) is not None
        }

    def configure_model(self) -> None:
        """Compile the networks once per process, before any step (Lightning calls this at the
        start of fit/validate/test, on every rank)."""
        if self.compile_mode is None or getattr(self, "_compiled", False):
            return
        for module in self.compiled_modules().values():
            module.compile(mode=self.compile_mode)
        self._compiled = True

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self.compile_mode == "reduce-overhead" and self.device.type == "cuda":
            # a new CUDA-graph generation per step: outputs of the previous one may be reused
            torch.compiler.cudagraph_mark_step_begin()

    # ------------------------------------------------------------------ optimizers
    def make_optimizer(self, factory: OptimizerFactory, params: Any) -> torch.optim.Optimizer:
        """``factory(params=params)``, with ``fused=True`` for Adam/AdamW on CUDA when the
        config sets neither ``fused`` nor ``foreach`` (one kernel per step instead of several
        per parameter group; same update to rounding)."""
        target = factory.func if isinstance(factory, functools.partial) else factory
        keywords = factory.keywords if isinstance(factory, functools.partial) else {}
        if (
            target in _FUSABLE_OPTIMIZERS
            and self.device.type == "cuda"
            and "fused" not in keywords
            and "foreach" not in keywords
        ):
            return factory(params=params, fused=True)
        return factory(params=params)

    def optimizer_params(self) -> Any:
        """What the optimizer trains: all parameters, or param groups (subclasses narrow it)."""
        return self.parameters()

    def configure_optimizers(self) -> Any:
        optimizer = self.make_optimizer(self.optimizer_factory, self.optimizer_params())
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer=optimizer)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": self.scheduler_interval},
        }


def _batch_size(batch: Any) -> int:
    if isinstance(batch, dict):
        first = next(iter(batch.values()))
    else:
        first = batch[0] if isinstance(batch, list | tuple) else batch
    return int(first.shape[0])
