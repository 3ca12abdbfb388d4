"""Task plumbing: the wrapper around train/eval, config extras and sweep metric lookup."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from importlib.util import find_spec
from typing import Any

from omegaconf import DictConfig

from latentzoo.utils.entry import user_error
from latentzoo.utils.logging import RankedLogger
from latentzoo.utils.rich_utils import print_config_tree

log = RankedLogger(__name__)


def extras(cfg: DictConfig) -> None:
    """Optional niceties before the task starts, controlled by ``cfg.extras``."""
    if not cfg.get("extras"):
        return
    if cfg.extras.get("ignore_warnings"):
        log.info("Disabling python warnings (extras.ignore_warnings=True)")
        warnings.filterwarnings("ignore")
    if cfg.extras.get("print_config"):
        print_config_tree(cfg, resolve=True, save_to_file=True)


def task_wrapper(task: Callable[[DictConfig], tuple[dict, dict]]) -> Callable:
    """Run a task so that a failure is logged to the run's log file and loggers are closed.

    The exception is re-raised so the process exits non-zero and Hydra multiruns see it.
    """

    @functools.wraps(task)
    def wrap(cfg: DictConfig) -> tuple[dict, dict]:
        try:
            return task(cfg)
        except Exception as error:
            # User mistakes get their message only; bugs get the traceback in the run's log.
            cause = user_error(error)
            if cause is not None:
                log.error(f"{type(cause).__name__}: {cause}")
            else:
                log.error(f"{type(error).__name__}: {error}", exc_info=True)
            raise
        finally:
            log.info(f"Output dir: {cfg.paths.output_dir}")
            if find_spec("wandb"):
                import wandb

                if wandb.run:
                    log.info("Closing wandb")
                    wandb.finish()

    return wrap


def get_metric_value(metric_dict: dict[str, Any], metric_name: str | None) -> float | None:
    """The value that a Hydra sweeper (e.g. Optuna) optimises, looked up by name."""
    if not metric_name:
        log.info("No optimized_metric set; returning None to the sweeper")
        return None
    if metric_name not in metric_dict:
        available = ", ".join(sorted(metric_dict)) or "none"
        raise KeyError(
            f"optimized_metric '{metric_name}' was not logged. Logged metrics: {available}. "
            "Set optimized_metric to one of them."
        )
    value = float(metric_dict[metric_name])
    log.info(f"Retrieved metric value {metric_name}={value:.6g}")
    return value
