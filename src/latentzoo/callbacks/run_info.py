"""Say plainly in the logs where a run starts from and how its loss moved."""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

import lightning as L

from latentzoo.utils.logging import RankedLogger

log = RankedLogger(__name__)


class ResumeReport(L.Callback):
    """Logs the global step and epoch training actually starts at (non-zero when resumed)."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.ckpt_path:
            log.info(
                f"Resumed from {trainer.ckpt_path}: continuing at global step "
                f"{trainer.global_step}, epoch {trainer.current_epoch}, with optimizer state"
            )
        else:
            log.info("Starting training from scratch at global step 0")


class LossReport(L.Callback):
    """At the end of training, logs each key's mean over the first and the last ``window``
    training steps, so a run's progress is visible without opening the CSV."""

    def __init__(self, keys: Sequence[str] = ("train/loss",), window: int = 20) -> None:
        self.keys = list(keys)
        self.window = window
        self.first: dict[str, list[float]] = {key: [] for key in self.keys}
        self.last: dict[str, deque] = {key: deque(maxlen=window) for key in self.keys}
        self.summary: dict[str, tuple[float, float]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        for key in self.keys:
            value = trainer.callback_metrics.get(key)
            if value is None:
                continue
            value = float(value)
            if len(self.first[key]) < self.window:
                self.first[key].append(value)
            self.last[key].append(value)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for key in self.keys:
            if not self.first[key]:
                continue
            start = sum(self.first[key]) / len(self.first[key])
            end = sum(self.last[key]) / len(self.last[key])
            self.summary[key] = (start, end)
            change = 100.0 * (end - start) / abs(start) if start else float("nan")
            log.info(
                f"{key}: {start:.4g} (mean of first {len(self.first[key])} steps) -> "
                f"{end:.4g} (mean of last {len(self.last[key])} steps), {change:+.1f}%"
            )
