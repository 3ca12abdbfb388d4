"""Turn user mistakes into a one-line message and exit status 2 instead of a traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from latentzoo.utils.errors import LatentzooError


def run_hydra_task(task: Callable[[DictConfig], Any], cfg: DictConfig) -> Any:
    """Run ``task(cfg)``; on a :class:`LatentzooError` in a single run, print it and exit 2.

    In a multirun the error is re-raised so the sweeper/launcher records the failed job.
    """
    try:
        return task(cfg)
    except LatentzooError as error:
        if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
            raise
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
