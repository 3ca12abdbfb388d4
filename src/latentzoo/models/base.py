"""Shared LightningModule plumbing: optimizer/scheduler from config partials, NaN guard."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning as L
import torch

from latentzoo.utils.errors import NonFiniteLossError

OptimizerFactory = Callable[..., torch.optim.Optimizer]
SchedulerFactory = Callable[..., torch.optim.lr_scheduler.LRScheduler]


class LatentModel(L.LightningModule):
    """Base for latentzoo models.

    Subclasses implement ``step(batch, stage) -> dict`` whose ``"loss"`` is optimised and whose
    other entries are logged as ``<stage>/<name>``. Optimizer and scheduler come from Hydra
    partials (``_partial_: true``) so they can be swapped from the command line.
    """

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

    def step(self, batch: Any, stage: str) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _shared_step(self, batch: Any, stage: str) -> torch.Tensor:
        terms = self.step(batch, stage)
        loss = terms["loss"]
        if stage == "train" and not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"loss is {loss.item()} at global step {self.global_step}; training stopped. "
                "Checkpoints written before this step are kept (see the checkpoints/ folder); "
                "lower the learning rate or check the data."
            )
        on_step = stage == "train"  # per-step curves in training, epoch means otherwise
        for name, value in terms.items():
            self.log(
                f"{stage}/{name}",
                value.detach(),
                prog_bar=name == "loss",
                on_step=on_step,
                on_epoch=not on_step,
                batch_size=_batch_size(batch),
                sync_dist=not on_step,
            )
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._shared_step(batch, "train")

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._shared_step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._shared_step(batch, "test")

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(params=self.parameters())
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer=optimizer)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": self.scheduler_interval},
        }


def _batch_size(batch: Any) -> int:
    first = batch[0] if isinstance(batch, list | tuple) else batch
    return int(first.shape[0])
