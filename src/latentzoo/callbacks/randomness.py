"""One run seed drives everything (DESIGN.md, "Contracts at scale": seeds).

``train.py`` seeds every process with the run seed before the model is built, so every rank
starts from the same weights. Once the processes know their rank (``setup``, before the first
batch), this callback re-seeds python, numpy and torch on each rank from ``(seed, rank)``: noise,
t, masks, posterior samples and augmentations then differ between ranks, and the same seed and
world size reproduce the same run. Dataloader workers get their own streams from Lightning's
worker init (``seed_everything(workers=True)`` derives them from the process seed, the worker id
and the global rank).
"""

from __future__ import annotations

import random

import lightning as L
import numpy as np
import torch

from latentzoo.utils.logging import RankedLogger

log = RankedLogger(__name__, rank_zero_only=True)


def rank_seed(seed: int, rank: int) -> int:
    """A 32-bit seed for ``rank``'s training randomness, decorrelated by numpy's SeedSequence."""
    return int(np.random.SeedSequence([int(seed), int(rank)]).generate_state(1)[0])


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # all devices too


class TrainingRandomness(L.Callback):
    """Re-seeds each rank's training randomness from ``(seed, global rank)`` at fit setup."""

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        seed_all(rank_seed(self.seed, trainer.global_rank))
        log.info(
            f"Seeding: weights from seed {self.seed} on every rank; training randomness from "
            f"(seed {self.seed}, rank r) for r < {trainer.world_size}; dataloader workers from "
            "(process seed, worker id, rank)"
        )
