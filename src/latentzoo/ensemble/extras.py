"""What a single run's trainer and callbacks do besides the optimizer step, done per member.

An ensemble member must log what ``train.py seed=s`` logs, at the same steps:

- **Validation** on the Lightning trainer's schedule (:class:`ValidationSchedule`:
  ``trainer.val_check_interval`` as steps or as a fraction of an epoch,
  ``check_val_every_n_epoch``, ``limit_val_batches``). Lightning validates after a training
  batch's callbacks and logs ``val/*`` at ``global_step - 1``; so does the ensemble.
- **The disentanglement callback** (``latentzoo.metrics.ground_truth.DisentanglementCallback``):
  the callback itself is built from ``cfg.callbacks`` and its ``DisentanglementMetrics`` scores
  each member, materialised as the real module of its single run, at ``every_n_steps`` and at the
  end of training, logged as ``disentanglement/<metric>/<score>`` at ``global_step``.
- **Learning-rate schedulers** are stepped after each training step by the engine
  (:meth:`StackedEnsemble.step_schedulers`); :class:`MemberExtras` tells it when an epoch ended.

- **Image grids** (reconstructions, traversals, samples): one callback per member, built from
  the member's single-run config (so ``<run>/members/<member>/images/``), called through its own
  hooks with the member's module and a minimal trainer stand-in.

Other callbacks (FID, lr monitor, loss report, ...) are not run per member; each one is named
once in a warning, so that nothing is dropped silently.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import hydra
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, ModelSummary, ProgressBar
from omegaconf import DictConfig

from latentzoo.callbacks.images import LatentTraversalGrid, ReconstructionGrid, SampleGrid
from latentzoo.metrics.ground_truth import DisentanglementCallback
from latentzoo.utils.errors import LatentzooError
from latentzoo.utils.logging import RankedLogger

if TYPE_CHECKING:
    from latentzoo.ensemble.run import EnsembleRun

log = RankedLogger(__name__, rank_zero_only=True)

GRIDS = (ReconstructionGrid, LatentTraversalGrid, SampleGrid)  # cheap: run per member


class ValidationSchedule:
    """When Lightning's training loop validates (``_should_check_val_fx``), for step-counted
    runs: every ``val_check_batch`` batches, counted over the whole run when
    ``check_val_every_n_epoch`` is null, else within the epochs it selects."""

    def __init__(self, trainer: DictConfig, batches_per_epoch: int) -> None:
        limit = trainer.get("limit_val_batches", 1.0)
        self.enabled = limit is None or float(limit) > 0
        given = trainer.get("val_check_interval")
        interval = 1.0 if given is None else given  # null: the end of every epoch
        self.every_n_epochs = trainer.get("check_val_every_n_epoch", 1)
        if isinstance(interval, bool) or not isinstance(interval, int | float):
            raise LatentzooError(
                f"ensemble: trainer.val_check_interval={interval} is a wall-clock cadence, which "
                "would validate members at steps that depend on speed; give a number of steps"
            )
        if isinstance(interval, int):
            if interval > batches_per_epoch and self.every_n_epochs is not None and self.enabled:
                raise LatentzooError(  # Lightning refuses this too
                    f"trainer.val_check_interval={interval} exceeds the {batches_per_epoch} "
                    "training batches of an epoch; set trainer.check_val_every_n_epoch=null to "
                    "count it over the whole run"
                )
            self.every = interval
        else:
            if self.every_n_epochs is None and given is not None:  # Lightning refuses it too
                raise LatentzooError(
                    f"trainer.val_check_interval={interval} is a fraction of an epoch; with "
                    "trainer.check_val_every_n_epoch=null give it as an integer number of steps"
                )
            self.every = max(1, int(batches_per_epoch * float(interval)))

    def due(self, steps_done: int, epoch_batches_done: int, epoch: int) -> bool:
        """Whether to validate after the batch that made ``steps_done`` training steps (the
        ``epoch_batches_done``-th batch of epoch ``epoch``)."""
        if not self.enabled:
            return False
        if self.every_n_epochs is None:
            return steps_done % self.every == 0
        if (epoch + 1) % int(self.every_n_epochs) != 0:
            return False
        return epoch_batches_done % self.every == 0


def loader_draws_seed(loader: Any) -> bool:
    """Whether the single run's validation pass over ``loader`` takes a draw from the training
    stream before its first batch: a ``DataLoader`` seeds each new iterator from the global CPU
    generator; with persistent workers the iterator of the sanity check is reused instead."""
    return isinstance(loader, torch.utils.data.DataLoader) and not loader.persistent_workers


def _locate(target: str) -> type | None:
    try:
        return hydra.utils.get_class(target)
    except Exception:  # noqa: BLE001 - an unknown class is only named in the warning
        return None


def member_callbacks(callbacks: DictConfig | None) -> list[tuple[str, type]]:
    """The callbacks of ``cfg.callbacks`` run per member (disentanglement scores, image grids),
    as (name, class) in the single run's order; every other callback the ensemble does not run
    is named once in a warning."""
    run = []
    for name, node in (callbacks or {}).items():
        if not isinstance(node, DictConfig) or "_target_" not in node:
            continue
        cls = _locate(node._target_)
        known = isinstance(cls, type)
        if known and issubclass(cls, (DisentanglementCallback, *GRIDS)):
            run.append((name, cls))
        elif known and issubclass(cls, ProgressBar | ModelSummary):  # the ensemble has its own
            continue
        elif known and issubclass(cls, ModelCheckpoint):  # last.ckpt: EnsembleRun.save
            if node.get("monitor") and node.get("save_top_k", 1) != 0:
                log.warning(
                    f"ensemble: callbacks.{name} keeps only last.ckpt per member (no best "
                    f"checkpoint by {node.monitor})"
                )
        else:
            log.warning(
                f"ensemble: callbacks.{name} ({node._target_}) is not run per member; train a "
                "single run for its outputs"
            )
    return run


def _due(every_n_steps: int, step: int) -> bool:
    """The periodic rule of the disentanglement and image-grid callbacks (``global_step``)."""
    return every_n_steps > 0 and step > 0 and step % every_n_steps == 0


class _MemberTrainer:
    """What the image-grid callbacks read from a trainer, for one member: rank 0 of one, the
    run's datamodule, the step; no image loggers (members log to CSV) and no stop signal."""

    is_global_zero = True
    world_size = 1
    global_rank = 0
    val_dataloaders = None
    loggers: tuple = ()
    callbacks: tuple = ()

    def __init__(self, datamodule: Any, global_step: int) -> None:
        self.datamodule = datamodule
        self.global_step = global_step


class MemberExtras:
    """Per-member validation, callbacks and scheduler cadence of one fit."""

    def __init__(self, run: EnsembleRun) -> None:
        self.run = run
        self.validation = ValidationSchedule(run.cfg.trainer, run.loaders.batches_per_epoch)
        # a disentanglement callback is shared (its metric holds no state); a grid is built per
        # member from that member's single-run config, so its images land in the member's folder
        self.callbacks: list[tuple[str, Any]] = [
            (name, hydra.utils.instantiate(run.cfg.callbacks[name]))
            if issubclass(cls, DisentanglementCallback)
            else (
                name,
                [hydra.utils.instantiate(run.member_cfg(m).callbacks[name]) for m in run.members],
            )
            for name, cls in member_callbacks(run.cfg.get("callbacks"))
        ]
        self._scored: dict[str, tuple[int, dict[str, torch.Tensor]]] = {}  # name -> (step, scores)

    def _epoch_position(self) -> tuple[int, bool]:
        """(batches of this epoch done, whether that was its last batch)."""
        loaders = self.run.loaders
        done = int(loaders.loaders[0].state_dict()["consumed"])
        return done, done >= loaders.batches_per_epoch

    def after_step(self) -> None:
        """Right after the optimizer step: the lr schedulers, as Lightning steps them."""
        self.run.ensemble.step_schedulers(epoch_ended=self._epoch_position()[1])

    def after_batch(self) -> None:
        """After the batch's training logs: the callbacks (``on_train_batch_end``, in config
        order), then validation (Lightning's ``on_advance_end``). Their draws continue each
        member's stream in that order, as the single run's continue its global RNG, and are
        undone before the next step (``TrainingRandomness``)."""
        step = self.run.step
        with self.run.ensemble.side_streams():
            for name, callback in self.callbacks:
                if isinstance(callback, DisentanglementCallback):
                    if _due(callback.every_n_steps, step):
                        self._log_scores(name, callback)
                elif _due(callback[0].every_n_steps, step):
                    self._draw(callback, end=False)
            done, _ = self._epoch_position()
            if self.validation.due(step, done, self.run.loaders.epoch):
                self.run.evaluate("val", step=step - 1)

    def train_end(self) -> None:
        """``on_train_end``: every disentanglement callback once more (it logs again when it
        has just run at this step; the scores are those same ones), and the final grids."""
        with self.run.ensemble.side_streams():
            for name, callback in self.callbacks:
                if isinstance(callback, DisentanglementCallback):
                    self._log_scores(name, callback)
                else:
                    self._draw(callback, end=True)

    @contextlib.contextmanager
    def _single_run_module(self, k: int) -> Iterator[Any]:
        """Member k as its single run's module, drawing from its stream as the global RNG."""
        model = member_module(self.run, k)
        try:
            with self.run.ensemble.member_as_global_rng(k):
                yield model
        finally:
            model.to("cpu")

    def _draw(self, per_member: list[Any], end: bool) -> None:
        """Each live member's grid callback, through its own hook, on the member's module."""
        run = self.run
        trainer = _MemberTrainer(run.datamodule, run.step)
        for k, callback in enumerate(per_member):
            if not bool(run.ensemble.alive[k]):
                continue
            with self._single_run_module(k) as model:
                if end:
                    callback.on_train_end(trainer, model)
                else:
                    callback.on_train_batch_end(trainer, model, None, None, 0)

    def _log_scores(self, name: str, callback: DisentanglementCallback) -> None:
        step = self.run.step
        last = self._scored.get(name)
        scores = last[1] if last and last[0] == step else self.member_scores(callback)
        self._scored[name] = (step, scores)
        if scores:
            self.run._log({f"disentanglement/{k}": v for k, v in scores.items()}, step, epoch=False)

    def member_scores(self, callback: DisentanglementCallback) -> dict[str, torch.Tensor]:
        """``callback.evaluate`` (its ``DisentanglementMetrics``) on every live member, as the
        real module of its single run; NaN for dropped members (they are not logged)."""
        from tqdm.auto import tqdm

        run, ensemble = self.run, self.run.ensemble
        per_member: dict[str, list[float]] = {}
        show = bool(run.cfg.trainer.get("enable_progress_bar", True))
        for k in tqdm(range(ensemble.num), desc="disentanglement", disable=not show):
            if not bool(ensemble.alive[k]):
                continue
            with self._single_run_module(k) as model:
                scores = callback.evaluate(model, run.datamodule)
            log.info(
                f"disentanglement of member {run.members[k].name} at step {run.step}: "
                + ", ".join(f"{key}={value:.3f}" for key, value in sorted(scores.items()))
            )
            for key, value in scores.items():
                per_member.setdefault(key, [float("nan")] * ensemble.num)[k] = float(value)
        return {
            key: torch.tensor(values, dtype=torch.float64) for key, values in per_member.items()
        }


def member_module(run: EnsembleRun, k: int) -> Any:
    """Member k as a real module on the run's device: its single run's model class holding the
    member's current weights (``member_state_dict``)."""
    model = run.ensemble.models[k]
    model.load_state_dict(run.ensemble.member_state_dict(k))
    return model.to(run.device)
