"""Hydra callbacks: checks that must happen before Hydra creates the run directory."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig


def log_dir_problem(log_dir: str | os.PathLike) -> str | None:
    """Why runs cannot be written below ``log_dir``, or None if they can."""
    path = Path(log_dir).expanduser().absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        return f"'{existing}' is a file, so the log dir '{path}' cannot be created"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"'{existing}' is not writable, so the log dir '{path}' cannot be created"
    return None


class CheckLogDir(Callback):
    """Stop with a one-line message (exit 2) when the log dir is not writable."""

    def _check(self, config: DictConfig) -> None:
        problem = log_dir_problem(config.paths.log_dir)
        if problem:
            hint = "Set paths.log_dir=... (or LATENTZOO_LOG_DIR)."
            print(f"error: {problem}. {hint}", file=sys.stderr)
            sys.exit(2)

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config)
