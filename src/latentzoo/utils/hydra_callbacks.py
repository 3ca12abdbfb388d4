"""Hydra callbacks: checks that must happen before Hydra creates the run directory, and the
one-line summary of a sweep whose jobs failed on a user mistake."""

from __future__ import annotations

import copy
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict

from latentzoo.utils.errors import LatentzooError


def log_dir_problem(log_dir: str | os.PathLike) -> str | None:
    """Why runs cannot be written below ``log_dir``, or None if they can.

    Writes (and removes) a probe folder in the deepest existing parent: ``os.access`` says yes
    to root everywhere, also inside /proc or on a read-only mount."""
    path = Path(log_dir).expanduser().absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        return f"'{existing}' is a file, so the log dir '{path}' cannot be created"
    try:
        Path(tempfile.mkdtemp(prefix=".latentzoo-write-probe-", dir=existing)).rmdir()
    except OSError as error:
        reason = error.strerror or type(error).__name__
        return f"the log dir '{path}' cannot be created: '{existing}' is not writable ({reason})"
    return None


def fail(message: str) -> None:
    """Print ``error: message`` and exit with status 2 (Hydra lets SystemExit through)."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


class CheckLogDir(Callback):
    """Stop with a one-line message (exit 2) when the log dir is not writable."""

    def _check(self, config: DictConfig) -> None:
        problem = log_dir_problem(config.paths.log_dir)
        if problem:
            fail(f"{problem}; set paths.log_dir=<a writable folder> (or LATENTZOO_LOG_DIR)")

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config)


class ValidateConfig(Callback):
    """Single run: refuse bad config values (:mod:`latentzoo.utils.validation`) in one line
    before the run dir exists, so a typo leaves nothing behind.

    Multirun: every job checks its own config (the sweep values differ) and a job that fails on
    a user mistake writes its record and lets the sweep go on; at the end this prints one line
    for those jobs and exits 2."""

    def __init__(self, task: str = "train") -> None:
        self.task = task
        self.sweep_started = time.time()

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        from latentzoo.utils.validation import TASK_CHECKS

        try:
            TASK_CHECKS[self.task](with_run_dir_placeholder(config))
        except LatentzooError as error:
            fail(str(error))

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.sweep_started = time.time()

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        failed = failed_jobs(Path(config.hydra.sweep.dir), since=self.sweep_started)
        if failed:
            first_job, first_error = failed[0]
            more = f" (and {len(failed) - 1} more)" if len(failed) > 1 else ""
            fail(
                f"{len(failed)} sweep job(s) failed, job {first_job}: {first_error}{more}; fix "
                f"and rerun them (records: {config.hydra.sweep.dir}/<job>/metrics.json)"
            )


def with_run_dir_placeholder(config: DictConfig) -> DictConfig:
    """A copy of ``config`` whose ``${hydra:runtime.output_dir}`` resolves (to a placeholder):
    Hydra fills it in only when it creates the run dir, after ``on_run_start``."""
    config = copy.deepcopy(config)
    with open_dict(config):
        if OmegaConf.is_missing(config.hydra.runtime, "output_dir"):
            config.hydra.runtime.output_dir = "<run dir>"
    HydraConfig.instance().set_config(config)  # run_job sets the real one next
    return config


def failed_jobs(sweep_dir: Path, since: float) -> list[tuple[str, str]]:
    """``(job, error)`` of this sweep's jobs whose ``metrics.json`` says ``failed``."""
    failed = []
    for record in sorted(sweep_dir.glob("*/metrics.json"), key=lambda p: _job_number(p.parent)):
        try:
            if record.stat().st_mtime < since - 1:
                continue  # an earlier sweep in the same dir (resume=auto)
            content = json.loads(record.read_text())
        except (OSError, ValueError):
            continue
        if content.get("status") == "failed":
            error = str(content.get("error") or "unknown error")
            failed.append((record.parent.name, error.split(": ", 1)[-1]))
    return failed


def _job_number(job_dir: Path) -> tuple[int, str]:
    return (int(job_dir.name), "") if job_dir.name.isdigit() else (sys.maxsize, job_dir.name)
