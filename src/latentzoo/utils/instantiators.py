"""Build callbacks and loggers from their config groups."""

from __future__ import annotations

import hydra
from lightning import Callback
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig

from latentzoo.utils.logging import RankedLogger

log = RankedLogger(__name__)


def _instantiate_group(cfg: DictConfig | None, kind: str) -> list:
    objects: list = []
    if not cfg:
        return objects
    if not isinstance(cfg, DictConfig):
        raise TypeError(f"The {kind} config must be a mapping of name -> config.")
    for name, conf in cfg.items():
        if isinstance(conf, DictConfig) and "_target_" in conf:
            log.info(f"Instantiating {kind} <{conf._target_}> ({name})")
            objects.append(hydra.utils.instantiate(conf))
    return objects


def instantiate_callbacks(cfg: DictConfig | None) -> list[Callback]:
    """Instantiate every entry of ``cfg.callbacks`` that has a ``_target_``."""
    return _instantiate_group(cfg, "callback")


def instantiate_loggers(cfg: DictConfig | None) -> list[Logger]:
    """Instantiate every entry of ``cfg.logger`` that has a ``_target_``."""
    return _instantiate_group(cfg, "logger")
