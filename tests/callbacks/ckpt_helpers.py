"""Test-only callbacks for the checkpointing tests, importable from CLI runs
(``+callbacks.marker._target_=tests.callbacks.ckpt_helpers.StepMarker``)."""

from __future__ import annotations

import time
from pathlib import Path

import lightning as L
import torch


class StepMarker(L.Callback):
    """Appends the global step reached to ``path`` after every training batch, then sleeps
    ``delay`` seconds (so a test can send a signal at a known step)."""

    def __init__(self, path: str, delay: float = 0.0) -> None:
        self.path = path
        self.delay = delay

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        with open(self.path, "a") as file:
            file.write(f"{trainer.global_step}\n")
        time.sleep(self.delay)


class PoisonWeights(L.Callback):
    """Sets one weight to NaN at the end of training step ``at_step`` (before any checkpoint
    callback: Lightning runs those last)."""

    def __init__(self, at_step: int) -> None:
        self.at_step = at_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.at_step:
            with torch.no_grad():
                next(pl_module.parameters()).view(-1)[0] = float("nan")


def read_steps(path) -> list[int]:
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return []
    return [int(line) for line in text.split("\n")[:-1] if line.strip()]


class SeedValidation(L.Callback):
    """Seeds the RNG at the start of every validation, so that a model that samples in its
    validation step (the VAE's reparameterisation) gets the same loss from the same weights."""

    def on_validation_start(self, trainer, pl_module) -> None:
        torch.manual_seed(0)
