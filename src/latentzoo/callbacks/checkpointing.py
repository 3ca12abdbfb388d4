"""Checkpoints that lose nothing and rank honestly.

:class:`Checkpoints` is Lightning's ``ModelCheckpoint`` with three changes:

* ``last.ckpt`` is refreshed on a cadence of its own (every ``every_n_train_steps`` optimizer
  steps and/or every ``every_n_minutes``), independent of validation, and on SIGINT/SIGTERM
  (Ctrl-C, SLURM preemption) at the current step: the signal handler only sets a flag; the save
  happens at the end of the current batch, on every rank (decided together under DDP), then
  training stops and :func:`stop_if_interrupted` exits with the command that resumes the run.
* The top-k ("best") checkpoints are written only at the end of a validation, ranked on that
  validation's metric: the metric always belongs to the weights in the file. Cadence saves only
  refresh ``last.ckpt``.
* Nothing is saved while the weights (or the EMA average) hold NaN/inf; a warning names the last
  finite checkpoint instead. Writes go through :class:`AtomicCheckpointIO` (temp file + rename),
  and temp files left by killed writes are deleted at the start of fit.
"""

from __future__ import annotations

import itertools
import os
import signal
import sys
import threading
import time
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn

from latentzoo.utils.atomic import remove_stale_temp_files
from latentzoo.utils.checkpoint_io import (
    TrainingInterrupted,
    _tensors,
    install_atomic_checkpoint_io,
    resume_advice,
)
from latentzoo.utils.logging import RankedLogger

log = RankedLogger(__name__, rank_zero_only=True)

STOP_SIGNALS = ("SIGINT", "SIGTERM")


def weights_finite(pl_module: L.LightningModule) -> bool:
    """Whether this rank's parameters, buffers and EMA average (``pl_module.ema``) are finite.

    One host-device sync."""
    tensors = itertools.chain(pl_module.parameters(), pl_module.buffers())
    ema = getattr(pl_module, "ema", None)
    if ema is not None and callable(getattr(ema, "state_dict", None)):
        tensors = itertools.chain(tensors, (t for _, t in _tensors(ema.state_dict(), "ema")))
    checks = [torch.isfinite(t).all() for t in tensors if t.is_floating_point() or t.is_complex()]
    if not checks:
        return True
    devices = {c.device for c in checks}
    if len(devices) > 1:
        return all(bool(c) for c in checks)
    return bool(torch.stack(checks).all())


class Checkpoints(ModelCheckpoint):
    """``ModelCheckpoint`` whose ``last.ckpt`` follows a step/time cadence and stop signals, whose
    top-k is ranked only at validation end, and which never saves non-finite weights.

    Args:
        every_n_train_steps: refresh ``last.ckpt`` every N optimizer steps (None/0: off).
        every_n_minutes: refresh ``last.ckpt`` every M minutes of training (None: off).
        save_on_signal: on SIGINT/SIGTERM save ``last.ckpt`` at the end of the current batch
            and stop training (a second signal acts at once, as without this callback).
        check_every_n_steps: under DDP, how often the ranks agree on signals and on rank 0's
            clock (one small collective and host sync): a signal that reached one rank only
            is acted on within this many steps. Step-cadence saves need no agreement.
        **kwargs: the other ``ModelCheckpoint`` arguments (``dirpath``, ``filename``,
            ``monitor``, ``mode``, ``save_top_k``, ``save_last``, ...).
    """

    def __init__(
        self,
        every_n_train_steps: int | None = 250,
        every_n_minutes: float | None = 30.0,
        save_on_signal: bool = True,
        check_every_n_steps: int = 10,
        **kwargs: Any,
    ) -> None:
        for key in ("train_time_interval", "every_n_epochs"):
            if kwargs.get(key) is not None:
                raise ValueError(
                    f"Checkpoints takes every_n_train_steps / every_n_minutes (for last.ckpt); "
                    f"the best checkpoints follow validation. Drop {key}."
                )
        kwargs.pop("train_time_interval", None)
        kwargs.pop("every_n_epochs", None)
        kwargs.setdefault("save_last", True)
        kwargs["save_on_train_epoch_end"] = False  # rank at validation end, never before
        super().__init__(**kwargs)
        self.last_every_n_steps = int(every_n_train_steps or 0)
        self.last_every_n_minutes = every_n_minutes
        self.save_on_signal = save_on_signal
        self.check_every_n_steps = max(1, int(check_every_n_steps))
        self._last_time = time.monotonic()
        self._last_cadence_step = -1  # global step of the last cadence/signal save of last.ckpt
        self._last_ranked_step = -1  # global step of the last validation-end ranking
        self._writes = 0
        self._signal: int | None = None  # set by the handler, read at the end of a batch
        self._previous_handlers: dict[int, Any] = {}
        self.stopped_by: tuple[str, int, str | None, int] | None = None

    # --- setup ----------------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        install_atomic_checkpoint_io(trainer)

    def _remove_stale_temp_files(self, trainer: L.Trainer) -> None:
        """Temp files of killed saves, in our folder and next to the checkpoint resumed from."""
        folders = [self.dirpath] if self.dirpath else []
        if trainer.ckpt_path and os.path.isfile(trainer.ckpt_path):
            folders.append(os.path.dirname(os.path.abspath(trainer.ckpt_path)))
        for folder in folders:
            for stale in remove_stale_temp_files(folder):
                log.info(f"Removed {stale.name}, left in {folder} by a killed save")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        if trainer.is_global_zero:
            self._remove_stale_temp_files(trainer)  # trainer.ckpt_path is known from here on
        self._last_time = time.monotonic()
        self._signal = None
        self.stopped_by = None
        if self.save_on_signal:
            self._install_handlers()

    # --- signals --------------------------------------------------------------------------------
    def _install_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for name in STOP_SIGNALS:
            signum = getattr(signal, name, None)
            if signum is None:
                continue
            self._previous_handlers[signum] = signal.getsignal(signum)
            signal.signal(signum, self._handle_signal)

    def _restore_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous_handlers = {}

    def _handle_signal(self, signum: int, frame: Any) -> None:
        """Only sets a flag (and says so on stderr); a second signal acts at once."""
        if self._signal is not None:
            previous = self._previous_handlers.get(signum)
            self._restore_handlers()
            if callable(previous):
                previous(signum, frame)
            elif signum == signal.SIGINT:
                raise KeyboardInterrupt
            else:
                signal.raise_signal(signum)
            return
        self._signal = signum
        name = signal.Signals(signum).name
        os.write(
            2,
            f"\n{name} received: saving last.ckpt at the end of this batch, then stopping "
            f"(send {name} again to stop at once, without saving)\n".encode(),
        )

    @property
    def stop_requested(self) -> bool:
        """A stop signal reached this rank (read by sampling callbacks, see ``interrupt.py``)."""
        return self._signal is not None

    # --- saving ---------------------------------------------------------------------------------
    def _skip(self, trainer: L.Trainer) -> bool:
        return (
            bool(trainer.fast_dev_run)
            or trainer.state.fn != TrainerFn.FITTING
            or trainer.sanity_checking
        )

    def _finite_or_warn(self, trainer: L.Trainer, pl_module: L.LightningModule, what: str) -> bool:
        finite = trainer.strategy.reduce_boolean_decision(weights_finite(pl_module), all=True)
        if not finite:
            log.warning(
                f"Not saving {what} at global step {trainer.global_step}: the weights hold "
                f"NaN/inf. {resume_advice(trainer)}"
            )
        return finite

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        super()._save_checkpoint(trainer, filepath)
        self._writes += 1

    def _save_last(self, trainer: L.Trainer, pl_module: L.LightningModule) -> bool:
        if not self.save_last:
            return False
        if not self._finite_or_warn(trainer, pl_module, "last.ckpt"):
            return False
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        self._last_cadence_step = trainer.global_step
        return True

    def _signal_stop(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Save ``last.ckpt`` now (if not saved at this step) and stop training."""
        signum = self._signal if self._signal is not None else signal.SIGTERM  # another rank's
        step = trainer.global_step
        saved = self._last_cadence_step == step or self._save_last(trainer, pl_module)
        path = os.path.abspath(self.last_model_path) if saved and self.last_model_path else None
        self.stopped_by = (signal.Signals(signum).name, int(signum), path, step)
        trainer.should_stop = True

    def _stop_requested(self, trainer: L.Trainer) -> bool:
        return bool(trainer.strategy.reduce_boolean_decision(self._signal is not None, all=False))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._skip(trainer) or self.stopped_by is not None:
            return
        step = trainer.global_step
        steps_due = (
            self.last_every_n_steps > 0
            and step > 0
            and step % self.last_every_n_steps == 0
            and step != self._last_cadence_step  # once per optimizer step (grad. accumulation)
        )
        now = time.monotonic()
        time_due = (
            self.last_every_n_minutes is not None
            and trainer.is_global_zero  # rank 0's clock decides for all
            and now - self._last_time >= 60.0 * self.last_every_n_minutes
        )
        event = self._signal is not None or steps_due or time_due
        if trainer.world_size > 1:
            # every rank sees steps_due alike; signals and rank 0's clock need a collective,
            # taken only every check_every_n_steps steps (not a host sync per step)
            if not steps_due and step % self.check_every_n_steps:
                return
            event = trainer.strategy.reduce_boolean_decision(event, all=False)
        if not event:
            return
        # one collective per event decides for all ranks (the flag may be set on one only)
        stop = self._stop_requested(trainer) if trainer.world_size > 1 else self._signal is not None
        self._last_time = now
        if stop:
            self._signal_stop(trainer, pl_module)
        elif step != self._last_cadence_step:
            self._save_last(trainer, pl_module)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pass  # ranking happens at validation end, last.ckpt on the cadence

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Rank the current weights on this validation's metric; then react to a signal that
        arrived during validation."""
        if self._skip(trainer):
            return
        step = trainer.global_step
        if step != self._last_ranked_step and self.save_top_k != 0:
            self._last_ranked_step = step
            if self._finite_or_warn(trainer, pl_module, "a top-k checkpoint"):
                before = self._writes
                candidates = self._monitor_candidates(trainer)
                self._save_topk_checkpoint(trainer, candidates)
                if self._writes > before and self.save_last:
                    # last.ckpt carries the new ranking (best_model_path) for a resume
                    self._save_last_checkpoint(trainer, candidates)
                    self._last_cadence_step = step
        if self.stopped_by is None and self._stop_requested(trainer):
            self._signal_stop(trainer, pl_module)

    # --- teardown -------------------------------------------------------------------------------
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.stopped_by is None and not self._skip(trainer) and self._stop_requested(trainer):
            # the signal came after the last batch (e.g. during an end-of-training sample grid,
            # which then aborted): save and exit with the resume command, not test (decided
            # together under DDP, as every rank reaches this hook)
            self._signal_stop(trainer, pl_module)
        self._restore_handlers()
        if self.save_last and not self._last_checkpoint_saved and not self._skip(trainer):
            self._save_last(trainer, pl_module)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._restore_handlers()
        super().on_exception(trainer, pl_module, exception)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._restore_handlers()
        super().teardown(trainer, pl_module, stage)


def stop_if_interrupted(trainer: L.Trainer) -> None:
    """After ``trainer.fit``: if a stop signal ended training, print how to resume and exit
    (:class:`TrainingInterrupted`, status 128 + signal number) instead of testing."""
    for callback in trainer.callbacks:
        stopped = getattr(callback, "stopped_by", None)
        if isinstance(callback, Checkpoints) and stopped is not None:
            name, signum, path, step = stopped
            interrupted = TrainingInterrupted(name, signum, path, step)
            if trainer.is_global_zero:
                if interrupted.resume_command:
                    message = f"{interrupted}. Resume with:\n  {interrupted.resume_command}"
                else:
                    message = f"{interrupted}. {resume_advice(trainer)}"
                log.warning(message)
                print(message, file=sys.stderr, flush=True)
            raise interrupted
