"""What a run decides once from its config about processes, batches and numerics.

* ``data.batch_size`` is per device; ``data.global_batch_size`` (a paper's batch) is divided by
  the world size, with a one-line error when it does not divide.
* Precision, TF32 and SyncBatchNorm belong to the experiment: ``trainer=ddp`` only adds
  processes. TF32 is the top-level ``float32_matmul_precision`` (``highest`` = exact fp32).
* A model that leaves parameters out of some losses says so itself
  (``ddp_find_unused_parameters = True``); only then does DDP search the graph for them.
"""

from __future__ import annotations

from typing import Any

import hydra
import lightning as L
import torch
from omegaconf import DictConfig, open_dict

from latentzoo.utils.errors import LatentzooError
from latentzoo.utils.logging import RankedLogger

log = RankedLogger(__name__, rank_zero_only=True)

MATMUL_PRECISIONS = ("highest", "high", "medium")


def set_matmul_precision(value: str | None) -> None:
    """``torch.set_float32_matmul_precision``: ``high`` allows TF32 on Ampere+ GPUs."""
    value = value or "highest"
    if value not in MATMUL_PRECISIONS:
        raise LatentzooError(
            f"float32_matmul_precision={value!r} is not one of {', '.join(MATMUL_PRECISIONS)}"
        )
    torch.set_float32_matmul_precision(value)


def strategy_for(trainer_cfg: DictConfig, model: Any) -> None:
    """Turn on DDP's unused-parameter search when (and only when) the model asks for it."""
    if trainer_cfg.get("sync_batchnorm") and trainer_cfg.get("accelerator") == "cpu":
        with open_dict(trainer_cfg):
            trainer_cfg.sync_batchnorm = False
        log.warning(
            "trainer.sync_batchnorm: PyTorch's SyncBatchNorm needs GPUs; on CPU processes each "
            "rank keeps its own BatchNorm statistics"
        )
    if getattr(model, "ddp_find_unused_parameters", False) and trainer_cfg.get("strategy") == "ddp":
        with open_dict(trainer_cfg):
            trainer_cfg.strategy = "ddp_find_unused_parameters_true"
        log.info(
            f"{type(model).__name__} leaves parameters out of some losses: DDP searches "
            "the graph for unused parameters (find_unused_parameters=True)"
        )


def resolve_batch_size(data_cfg: DictConfig, world_size: int) -> DictConfig:
    """Set ``data_cfg.batch_size`` per device from ``global_batch_size`` when that is given, log
    G = B × W, and return the config to instantiate (without ``global_batch_size``)."""
    with open_dict(data_cfg):
        global_batch = data_cfg.get("global_batch_size")
        if global_batch is not None:
            global_batch = int(global_batch)
            if global_batch <= 0 or global_batch % world_size:
                raise LatentzooError(
                    f"data.global_batch_size={global_batch} does not divide into the world size "
                    f"{world_size}; choose a multiple of {world_size} or set data.batch_size "
                    "(per device) instead"
                )
            per_device = global_batch // world_size
            if data_cfg.get("batch_size") not in (None, per_device):
                log.warning(
                    f"data.batch_size={data_cfg.batch_size} is replaced by data.global_batch_size="
                    f"{global_batch} / world {world_size}; set data.global_batch_size=null to "
                    "choose the per-device batch yourself"
                )
            data_cfg.batch_size = per_device
    batch = data_cfg.get("batch_size")
    if batch is not None:
        log.info(
            f"global batch {int(batch) * world_size} = {batch} per device × world {world_size}"
        )
    datamodule_cfg = data_cfg.copy()
    with open_dict(datamodule_cfg):
        datamodule_cfg.pop("global_batch_size", None)
    return datamodule_cfg


def instantiate_datamodule(data_cfg: DictConfig, world_size: int = 1) -> L.LightningDataModule:
    """The datamodule of ``data_cfg`` with its per-device batch for ``world_size`` processes."""
    return hydra.utils.instantiate(resolve_batch_size(data_cfg, world_size))
