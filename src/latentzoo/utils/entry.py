"""Turn user mistakes into a one-line message and exit status 2 instead of a traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from latentzoo.utils.errors import LatentzooError


def user_error(error: BaseException | None) -> LatentzooError | None:
    """The :class:`LatentzooError` behind ``error``, also when Hydra's ``instantiate`` wrapped
    it (e.g. a missing dataset raised while building the datamodule)."""
    while error is not None:
        if isinstance(error, LatentzooError):
            return error
        error = error.__cause__ or error.__context__
    return None


def run_hydra_task(task: Callable[[DictConfig], Any], cfg: DictConfig) -> Any:
    """Run ``task(cfg)``; on a user error in a single run, print it and exit 2.

    In a multirun the error is re-raised so the sweeper/launcher records the failed job.
    """
    try:
        return task(cfg)
    except Exception as error:
        cause = user_error(error)
        multirun = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
        if cause is None or multirun:
            raise
        print(f"error: {cause}", file=sys.stderr)
        sys.exit(2)
