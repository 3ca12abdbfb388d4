"""The training-loop state a single run's ``last.ckpt`` carries, for an ensemble member's.

``train.py seed=s ckpt_path=<member>/checkpoints/last.ckpt`` hands the member's checkpoint to
Lightning, which restores its step count, epoch and loader position from ``checkpoint["loops"]``
(and TrainingRandomness its noise stream from ``checkpoint["callbacks"]``). Without ``loops``
Lightning would start again at step 0 on a fresh pass of the data. So a member writes the state
of a single run whose ``last.ckpt`` was saved by the step cadence (``Checkpoints`` in
``on_train_batch_end``) after the same number of steps: from that state the single run continues
exactly as if it had never stopped.

Why the cadence form: a single run's ``last.ckpt`` written after fit ends off the cadence
(``save_final_last``) counts the running epoch as completed, and Lightning resumes it at the
next epoch's first batch, not where the uninterrupted run would go on. A member always writes
the cadence form, so resuming it continues the epoch, as ``train.py seed=s`` run straight does.

**Dropped members** (a non-finite loss at step ``d``) write the state their single run had
before step ``d``: the weights and optimizer of that moment (the engine's snapshot), step ``d``,
the loader at batch ``d`` and the noise streams from before step ``d``. That is what a failed
single run leaves to resume from (its last finite save is at or before ``d``): resumed, it
replays step ``d`` with the same weights, data and noise, so a deterministic cause fails it
there again (``NonFiniteLossError``, as the single run), and with the cause gone it continues
as the single run would have (tested with a NaN batch). The noise streams from before step
``d`` come from the engine's snapshot at the drop; a snapshot without them (an older ensemble
checkpoint) leaves the member's current streams, which do not resume exactly.

The dict is produced by Lightning's own loop objects (``_FitLoop`` and the evaluation and
prediction loops, as ``_CheckpointConnector`` collects them); only their progress counters are
set here, to the values the loops hold at that hook (see ``loops/training_epoch_loop.py``):

- epoch ``e`` is running: the epoch progress is ready/started ``e + 1``, processed/completed
  ``e``;
- ``n`` batches trained in all, ``b`` of them in epoch ``e``: the batch progress is
  ready/started/processed ``n`` (``b`` in this epoch), completed ``n - 1`` (``b - 1``): the
  batch-end hooks run before the batch counts as completed, and Lightning completes it on
  resume; ``is_last_batch`` when ``b`` is the epoch's last batch;
- ``_batches_that_stepped`` is ``n - 1`` (incremented after the hooks, and again on resume);
- one optimizer step per batch (the ensemble does not accumulate): the automatic optimisation's
  step and zero_grad counters are ``n`` (``b`` in this epoch, as its ``current`` is reset at
  each epoch start), the manual optimisation's (FactorVAE, two optimizers but one counted step
  per batch, like its single run's ``global_step``) ``n`` in both.

The checkpoint callbacks' states (``checkpoint_callback_states``) say which ``last.ckpt`` is
theirs: a single run continuing in the member's dir (``resume=auto``) then refreshes that file
instead of writing ``last-v1.ckpt`` beside it.

The validation, test and prediction counters (and the lr schedulers' progress counters) are
zero: they do not steer where training resumes; the schedulers' own states, which do, are in
``lr_schedulers``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import hydra
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loops import _EvaluationLoop, _FitLoop, _PredictionLoop
from lightning.pytorch.trainer.states import RunningStage, TrainerFn
from lightning.pytorch.utilities.combined_loader import CombinedLoader

from latentzoo.utils.errors import LatentzooError
from latentzoo.utils.resume import _is_model_checkpoint


class _Position:
    """A stateful stand-in for the training loader at a position (what ``CombinedLoader``
    collects for the fit loop's ``combined_loader`` entry)."""

    def __init__(self, state: dict[str, int]) -> None:
        self.state = dict(state)

    def __iter__(self):  # noqa: ANN204 - never iterated; CombinedLoader wants an iterable
        return iter(())

    def state_dict(self) -> dict[str, int]:
        return dict(self.state)

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.state = dict(state)


def loader_position(steps: int, batches_per_epoch: int) -> dict[str, int]:
    """The loader state ``{"epoch", "consumed"}`` after ``steps`` batches of a fresh run (the
    last batch of an epoch leaves ``consumed == batches_per_epoch``, as the loader reports it)."""
    if steps <= 0:
        return {"epoch": 0, "consumed": 0}
    return {
        "epoch": (steps - 1) // batches_per_epoch,
        "consumed": (steps - 1) % batches_per_epoch + 1,
    }


def single_run_training_state(
    global_step: int,
    loader_state: dict[str, int],
    batches_per_epoch: int,
    automatic_optimization: bool,
) -> dict[str, Any]:
    """``{"epoch", "global_step", "loops"}`` of a single run's ``last.ckpt`` saved at the end of
    training batch ``global_step``, its training loader at ``loader_state``."""
    n = int(global_step)
    epoch, b = int(loader_state["epoch"]), int(loader_state["consumed"])
    if n < 0 or not 0 <= b <= min(n, batches_per_epoch) or (n > 0) != (b > 0):
        raise LatentzooError(
            f"a member at step {n} cannot have its loader at batch {b} of epoch {epoch} "
            f"({batches_per_epoch} batches per epoch): its checkpoint would not resume"
        )
    fit = _FitLoop(None, min_epochs=None, max_epochs=None)  # type: ignore[arg-type]
    fit._combined_loader = CombinedLoader(_Position(loader_state), "max_size_cycle")
    if n > 0:
        for tracker in (fit.epoch_progress.total, fit.epoch_progress.current):
            _count(tracker, ready=epoch + 1, started=epoch + 1, processed=epoch, completed=epoch)
        batches = fit.epoch_loop.batch_progress
        for tracker, k in ((batches.total, n), (batches.current, b)):
            _count(tracker, ready=k, started=k, processed=k, completed=k - 1)
        batches.is_last_batch = b >= batches_per_epoch
        fit.epoch_loop._batches_that_stepped = n - 1
        if automatic_optimization:
            optimizer = fit.epoch_loop.automatic_optimization.optim_progress.optimizer
            for progress in (optimizer.step, optimizer.zero_grad):
                for tracker, k in ((progress.total, n), (progress.current, b)):
                    _count(tracker, ready=k, started=k, completed=k)
        else:
            steps = fit.epoch_loop.manual_optimization.optim_step_progress
            for tracker in (steps.total, steps.current):
                _count(tracker, ready=n, completed=n)
    return {
        "epoch": epoch,
        "global_step": n,
        "loops": {
            "fit_loop": fit.state_dict(),
            "validate_loop": _evaluation(TrainerFn.VALIDATING, RunningStage.VALIDATING),
            "test_loop": _evaluation(TrainerFn.TESTING, RunningStage.TESTING),
            "predict_loop": _PredictionLoop(None, inference_mode=True).state_dict(),  # type: ignore[arg-type]
        },
    }


def _count(tracker: Any, **counts: int) -> None:
    """Set a progress tracker's counters (those it has: ``started`` is not on every kind)."""
    for name, value in counts.items():
        if hasattr(tracker, name):
            setattr(tracker, name, int(value))


def _evaluation(fn: TrainerFn, stage: RunningStage) -> dict[str, Any]:
    return _EvaluationLoop(None, fn, stage, inference_mode=True).state_dict()  # type: ignore[arg-type]


def checkpoint_callback_states(cfg: Any, last: Path) -> dict[str, Any]:
    """``checkpoint["callbacks"]`` entries of the single run's checkpoint callbacks (those of
    ``cfg.callbacks`` that are ``ModelCheckpoint``s), as they stand once ``last`` was saved: no
    best checkpoints (the ensemble ranks none), ``last`` as the ``last.ckpt`` of the callback
    that keeps it in ``last``'s folder."""
    states = {}
    for callback_cfg in (cfg.get("callbacks") or {}).values():
        if not isinstance(callback_cfg, Mapping) or not _is_model_checkpoint(
            callback_cfg.get("_target_")
        ):
            continue
        callback: ModelCheckpoint = hydra.utils.instantiate(callback_cfg)
        if callback.save_last and callback.dirpath and Path(callback.dirpath) == last.parent:
            callback.last_model_path = str(last)
        states[callback.state_key] = callback.state_dict()
    return states
