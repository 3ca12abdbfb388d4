"""Turn user mistakes into a one-line message and exit status 2 instead of a traceback."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from latentzoo.utils.errors import LatentzooError

STARTED = time.time()  # a record older than this process is not this run's


def user_error(error: BaseException | None) -> LatentzooError | None:
    """The :class:`LatentzooError` behind ``error``, also when Hydra's ``instantiate`` wrapped
    it (e.g. a missing dataset raised while building the datamodule)."""
    while error is not None:
        if isinstance(error, LatentzooError):
            return error
        error = error.__cause__ or error.__context__
    return None


def run_hydra_task(task: Callable[[DictConfig], Any], cfg: DictConfig) -> Any:
    """Run ``task(cfg)``; a user error ends the job with one line, a bug with its traceback.

    Single run: print ``error: <message>`` and exit 2. Multirun: the job's record
    (``metrics.json``, status ``failed``) keeps the message, ``None`` is returned so the sweep
    goes on, and the ValidateConfig Hydra callback sums the failures up at the end (exit 2).
    """
    try:
        return task(cfg)
    except Exception as error:
        cause = user_error(error)
        if cause is None:
            raise
        record_failure(cfg, cause)
        if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
            return None
        print(f"error: {cause}", file=sys.stderr)
        sys.exit(2)


def record_failure(cfg: DictConfig, cause: LatentzooError) -> None:
    """Write the run's ``metrics.json`` (status ``failed``) unless the task wrote one in this
    process (train's record); an older one (a rerun of an eval dir) is replaced."""
    from latentzoo.utils.run_record import FILENAME, RunRecord

    output_dir = OmegaConf.select(cfg, "paths.output_dir", default=None)
    if not HydraConfig.initialized() or not output_dir:
        return  # outside a Hydra run (called from code)
    record = Path(output_dir, FILENAME)
    if record.exists() and record.stat().st_mtime >= STARTED:
        return
    with contextlib.suppress(OSError):  # the message is printed either way
        RunRecord(output_dir).write("failed", error=cause)
