"""Send the run's config and parameter counts to every logger."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.utilities import rank_zero_only
from omegaconf import OmegaConf

from latentzoo.utils.logging import RankedLogger

log = RankedLogger(__name__)


@rank_zero_only
def log_hyperparameters(object_dict: dict[str, Any]) -> None:
    """Log the resolved config plus total/trainable/frozen parameter counts."""
    cfg = OmegaConf.to_container(object_dict["cfg"], resolve=True)
    model = object_dict["model"]
    trainer = object_dict["trainer"]
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info(f"Model parameters: {total:,} total, {trainable:,} trainable")
    if not trainer.loggers:
        return
    keys = ("model", "data", "trainer", "callbacks", "task_name", "tags", "ckpt_path", "seed")
    hparams: dict[str, Any] = {key: cfg.get(key) for key in keys}
    hparams["model/params/total"] = total
    hparams["model/params/trainable"] = trainable
    hparams["model/params/non_trainable"] = total - trainable
    for logger in trainer.loggers:
        logger.log_hyperparams(hparams)
