"""``<run>/metrics.json``: a run's final metrics and outcome, for ``python -m latentzoo.collect``.

Written at the end of every train run, also when it fails (status ``"failed"`` and the error),
so that a sweep's summary lists crashed runs instead of silently dropping them. A run stopped by
SIGINT/SIGTERM has status ``"interrupted"`` and ``resume_command``, the exact command that
continues it from the ``last.ckpt`` saved at the step it reached. Written atomically.
"""

from __future__ import annotations

import functools
import json
import time
import traceback
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig

from latentzoo.utils.atomic import atomic_write_text
from latentzoo.utils.checkpoint_io import (
    TrainingInterrupted,
    last_finite_checkpoint,
    resume_command,
)
from latentzoo.utils.entry import user_error
from latentzoo.utils.logging import RankedLogger

log = RankedLogger(__name__, rank_zero_only=True)

FILENAME = "metrics.json"


class LastLoggedMetrics(Logger):
    """An in-memory logger that keeps the last value of every metric sent to the loggers.

    Callbacks such as the disentanglement callback log straight to ``trainer.loggers`` (their
    scores never reach ``trainer.callback_metrics``); this catches them for ``metrics.json``.
    """

    def __init__(self, save_dir: str | None = None) -> None:
        super().__init__()
        self._save_dir = save_dir
        self.metrics: dict[str, float] = {}

    @property
    def name(self) -> str:
        return "last_logged_metrics"

    @property
    def version(self) -> int:
        return 0

    @property
    def save_dir(self) -> str | None:
        return self._save_dir

    @rank_zero_only
    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        for key, value in metrics.items():
            if key != "epoch":  # Lightning adds it to every call; the record has its own
                self.metrics[key] = float(value)


class RunRecord:
    """Collects what ``metrics.json`` needs while the task runs; see :func:`record_run`."""

    def __init__(self, output_dir: str | Path) -> None:
        self.path = Path(output_dir) / FILENAME
        self.logged = LastLoggedMetrics(save_dir=str(output_dir))
        self.trainer: Any = None  # set by the task once built: gives step, epoch, best ckpt
        self.started = time.time()

    def write(
        self,
        status: str,
        metrics: Mapping[str, float] | None = None,
        error: BaseException | None = None,
    ) -> None:
        if rank_zero_only.rank != 0:
            return
        trainer = self.trainer
        checkpoint = getattr(trainer, "checkpoint_callback", None) if trainer else None
        record: dict[str, Any] = {
            "status": status,
            "global_step": trainer.global_step if trainer else None,
            "epoch": trainer.current_epoch if trainer else None,
            # what the loggers got last (incl. callback-logged scores) under the final values
            "metrics": {**self.logged.metrics, **(metrics or {})},
            "best_model_path": getattr(checkpoint, "best_model_path", None) or None,
            "duration_s": round(time.time() - self.started, 3),
            "error": None,
        }
        if isinstance(error, TrainingInterrupted):
            record["error"] = str(error)
            record["interrupted_by"] = error.signame
            record["last_checkpoint"] = error.checkpoint
            record["resume_command"] = error.resume_command
        elif error is not None:
            cause = user_error(error)
            record["error"] = f"{type(cause or error).__name__}: {cause or error}"
            if cause is None:  # a bug: where it happened; a user mistake: its message suffices
                record["traceback"] = "".join(traceback.format_exception(error)[-20:])
            last = last_finite_checkpoint(trainer)
            if last is not None:
                record["last_checkpoint"] = last[0]
                record["resume_command"] = resume_command(last[0])
        atomic_write_text(self.path, json.dumps(record, indent=2, default=str))
        log.info(f"Run record ({status}) written to {self.path}")


def record_run(task: Callable[[DictConfig, RunRecord], tuple[dict, dict]]) -> Callable:
    """Call ``task(cfg, record)`` and write ``<cfg.paths.output_dir>/metrics.json``: status
    ``completed`` (or ``interrupted``) with the returned metrics, or ``failed`` with the error,
    which is then re-raised. The decorated function is called as ``task(cfg)``."""

    @functools.wraps(task)
    def wrap(cfg: DictConfig) -> tuple[dict, dict]:
        record = RunRecord(cfg.paths.output_dir)
        try:
            metrics, objects = task(cfg, record)
        except BaseException as error:
            # Lightning turns Ctrl-C into a graceful shutdown, then SystemExit(1)
            stopped = bool(getattr(record.trainer, "interrupted", False))
            ctrl_c = isinstance(error, SystemExit) and stopped
            interrupted = isinstance(error, KeyboardInterrupt | TrainingInterrupted) or ctrl_c
            status = "interrupted" if interrupted else "failed"
            try:
                record.write(status, error=error)
            except Exception as write_error:  # never hide the real error behind this one
                log.warning(f"Could not write {record.path}: {write_error}")
            raise
        interrupted = bool(getattr(objects.get("trainer"), "interrupted", False))
        record.write("interrupted" if interrupted else "completed", metrics)
        return metrics, objects

    return wrap
