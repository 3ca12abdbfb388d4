"""``data.on_bad_sample=skip``: corrupt samples are dropped, counted, and reported per epoch.

DataLoader workers are separate processes, so the count and the first paths live in
shared-memory tensors with one row per worker (no locks); the main process reads and clears them
at the end of each epoch, sums them over DDP ranks, and logs one warning line.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch.utils.data import get_worker_info

from latentzoo.utils.errors import LatentzooError
from latentzoo.utils.logging import RankedLogger

log = RankedLogger(__name__, rank_zero_only=True)

MODES = ("error", "skip")
SHOWN = 3  # paths named in the report


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise LatentzooError(f"data.on_bad_sample={mode!r} is not one of {'|'.join(MODES)}")
    return mode


class BadSampleLog:
    """Skipped samples of one split, shared by the main process (row 0) and its workers."""

    def __init__(self, rows: int = 65, keep: int = SHOWN, width: int = 400) -> None:
        self.counts = torch.zeros(rows, dtype=torch.int64).share_memory_()
        self.names = torch.zeros(rows, keep, width, dtype=torch.uint8).share_memory_()

    def add(self, source: str, what: str) -> None:
        """Record one skipped sample (called where it was read: a worker or the main process)."""
        info = get_worker_info()
        row = 0 if info is None else 1 + info.id % (len(self.counts) - 1)
        n = int(self.counts[row])
        if n < self.names.shape[1]:
            text = f"{source} ({what})".encode()[: self.names.shape[2]]
            self.names[row, n].zero_()
            self.names[row, n, : len(text)] = torch.frombuffer(bytearray(text), dtype=torch.uint8)
        self.counts[row] += 1

    def take(self) -> tuple[int, list[str]]:
        """The count and first names since the last call, then cleared."""
        count = int(self.counts.sum())
        names = []
        for row in torch.nonzero(self.counts).flatten().tolist():
            for k in range(min(int(self.counts[row]), self.names.shape[1])):
                names.append(
                    bytes(self.names[row, k].tolist()).rstrip(b"\0").decode(errors="replace")
                )
        self.counts.zero_()
        return count, names


class BadSampleReport(L.Callback):
    """Logs, at the end of each train/val/test epoch, how many samples of that split were
    skipped (all ranks together) and the first few of them."""

    def __init__(self, logs: dict[str, BadSampleLog], name: str) -> None:
        self.logs = logs
        self.name = name

    def _report(self, trainer: L.Trainer, split: str) -> None:
        sample_log = self.logs.get(split)
        if sample_log is None:
            return
        count, names = sample_log.take()
        if trainer.world_size > 1 and torch.distributed.is_initialized():
            gathered: list[Any] = [None] * trainer.world_size
            torch.distributed.all_gather_object(gathered, (count, names))
            count = sum(c for c, _ in gathered)
            names = [n for _, ns in gathered for n in ns]
        if count:
            more = f" and {count - SHOWN} more" if count > SHOWN else ""
            log.warning(
                f"{self.name}: skipped {count} bad sample(s) in this {split} epoch "
                f"(data.on_bad_sample=skip): {'; '.join(names[:SHOWN])}{more}"
            )

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._report(trainer, "train")

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._report(trainer, "val")
        elif "val" in self.logs:  # the same files come up again in the first real epoch
            self.logs["val"].take()

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._report(trainer, "test")


def attach_report(datamodule: L.LightningDataModule, logs: dict[str, BadSampleLog]) -> None:
    """Add a :class:`BadSampleReport` to the datamodule's trainer (once)."""
    trainer = getattr(datamodule, "trainer", None)
    if trainer is None or any(isinstance(c, BadSampleReport) for c in trainer.callbacks):
        return
    trainer.callbacks.append(BadSampleReport(logs, getattr(datamodule, "name", "data")))
