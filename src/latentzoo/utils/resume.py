"""``resume=auto``: a re-run continues its run dir instead of starting over.

    python train.py -m model.beta=1,2,4 resume=auto hydra.sweep.dir=logs/sweeps/beta
    # killed? run the same command again: finished jobs are skipped, the others resume

With ``resume=auto`` a run whose dir already holds

- a finished record (``metrics.json`` with status ``completed``) is not trained again: the task
  returns the recorded metrics (so a sweeper such as Optuna still gets its value);
- a ``last.ckpt`` (of a ModelCheckpoint with ``save_last``) continues from it: weights,
  optimizer, step, and whatever else the checkpoint carries;
- neither starts from scratch (or from ``ckpt_path``, if given).

A re-run finds its dir again only when the dir is fixed: ``hydra.sweep.dir=...`` for a multirun
(job ``<n>`` = the n-th combination of the same sweep arguments), ``hydra.run.dir=...`` for a
single run, e.g. ``hydra.run.dir=logs/train/runs/slurm_$SLURM_JOB_ID`` in a job script (the
job id survives a requeue). Default run dirs are unique per process, so they never match.

Every start (any ``resume`` setting) is recorded in ``<run>/resume.json`` (time, checkpoint,
step), and the record of an earlier attempt (``metrics.json``) is cleared at the start of a new
one, so ``python -m latentzoo.collect`` shows a dir without a record as running or killed and
counts how often a run was resumed. With ``resume=auto`` a dir first started with other
overrides is refused (e.g. ``hydra.sweep.dir`` reused for a different sweep).
"""

from __future__ import annotations

import functools
import json
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig

from latentzoo.utils.errors import LatentzooError
from latentzoo.utils.logging import RankedLogger
from latentzoo.utils.run_record import FILENAME as RECORD_FILE

log = RankedLogger(__name__, rank_zero_only=True)

RESUME_FILE = "resume.json"
FINISHED = ("completed", "finished")  # metrics.json statuses of a run that needs nothing more
OFF = (None, False, "off", "false", "never", "no")


def resume_mode(cfg: DictConfig) -> str:
    """``"auto"`` or ``"off"`` from ``cfg.resume``."""
    value = cfg.get("resume")
    if isinstance(value, str):
        value = value.strip().lower()
    if value in OFF:
        return "off"
    if value == "auto":
        return "auto"
    raise LatentzooError(f"resume={cfg.get('resume')} is not a resume mode: use auto or off")


def run_dir(cfg: DictConfig) -> Path:
    return Path(cfg.paths.output_dir)


def read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path``, or None when it is missing or unreadable."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    """Write atomically (temp file in the same folder, then rename): a kill leaves old or new."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


def job_overrides() -> list[str]:
    """This job's command-line overrides (a multirun job's own combination), without
    ``resume=...``: what identifies the job in its run dir."""
    if not HydraConfig.initialized():
        return []
    overrides = HydraConfig.get().overrides.task
    return sorted(str(o) for o in overrides if not str(o).lstrip("+~").startswith("resume="))


def finished_record(cfg: DictConfig) -> dict[str, Any] | None:
    """With ``resume=auto``: the run dir's ``metrics.json`` if it records a finished run."""
    if resume_mode(cfg) != "auto":
        return None
    record = read_json(run_dir(cfg) / RECORD_FILE)
    if record is None or record.get("status") not in FINISHED:
        return None
    check_same_job(cfg)
    return record


def _is_model_checkpoint(target: Any) -> bool:
    """``ModelCheckpoint`` or a subclass (latentzoo's ``Checkpoints``)."""
    try:
        return issubclass(hydra.utils.get_class(str(target)), ModelCheckpoint)
    except Exception:  # not importable: not a checkpoint callback we can follow
        return False


def last_checkpoints(cfg: DictConfig) -> list[Path]:
    """Where this config's ModelCheckpoint callbacks with ``save_last`` keep ``last.ckpt``."""
    paths = []
    for callback in (cfg.get("callbacks") or {}).values():
        if not isinstance(callback, Mapping) or not callback.get("save_last"):
            continue
        if _is_model_checkpoint(callback.get("_target_")) and callback.get("dirpath"):
            paths.append(Path(str(callback["dirpath"])) / "last.ckpt")
    paths.append(run_dir(cfg) / "checkpoints" / "last.ckpt")
    return list(dict.fromkeys(paths))


def own_last_checkpoint(cfg: DictConfig) -> Path | None:
    """The newest ``last.ckpt`` this run has written, if any."""
    found = [path for path in last_checkpoints(cfg) if path.is_file()]
    return max(found, key=lambda path: path.stat().st_mtime) if found else None


def check_same_job(cfg: DictConfig) -> None:
    """Refuse to continue a run dir that another job (other overrides) started."""
    history = read_json(run_dir(cfg) / RESUME_FILE)
    if not history or "overrides" not in history:
        return
    mine = job_overrides()
    if sorted(history["overrides"]) != mine:
        raise LatentzooError(
            f"resume=auto: run dir {run_dir(cfg)} belongs to a job with overrides "
            f"{' '.join(history['overrides']) or '(none)'}, not {' '.join(mine) or '(none)'}. "
            "Give this job its own hydra.run.dir / hydra.sweep.dir, or repeat that job's "
            "overrides exactly."
        )


def checkpoint_to_resume(cfg: DictConfig) -> str | None:
    """The checkpoint to fit from, and a record of this start in ``<run>/resume.json``.

    ``cfg.ckpt_path`` unless ``resume=auto`` finds this run's own ``last.ckpt``. Clears the
    ``metrics.json`` of an earlier attempt (its status is kept in ``resume.json``)."""
    mode = resume_mode(cfg)
    ckpt_path = cfg.get("ckpt_path") or None
    resumed = False
    if mode == "auto":
        check_same_job(cfg)
        last = own_last_checkpoint(cfg)
        if last is not None:
            log.info(f"resume=auto: continuing this run from its own checkpoint {last}")
            ckpt_path, resumed = str(last), True
        else:
            log.info(f"resume=auto: no last.ckpt in {run_dir(cfg)} yet; starting this run")
    note_start(cfg, ckpt_path, resumed)
    return ckpt_path


@rank_zero_only
def note_start(cfg: DictConfig, ckpt_path: str | None, resumed: bool) -> None:
    """Append this start to ``resume.json``; move an earlier attempt's record into it."""
    directory = run_dir(cfg)
    history = read_json(directory / RESUME_FILE) or {}
    history.setdefault("overrides", job_overrides())
    starts = history.setdefault("starts", [])
    previous = read_json(directory / RECORD_FILE)
    starts.append(
        {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "pid": os.getpid(),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "resume": resume_mode(cfg),
            "resumed_from": ckpt_path if resumed else None,
            "ckpt_path": ckpt_path,
            "previous_status": previous.get("status") if previous else None,
        }
    )
    history["resumed"] = sum(1 for start in starts if start.get("resumed_from"))
    write_json(directory / RESUME_FILE, history)
    (directory / RECORD_FILE).unlink(missing_ok=True)


def skip_finished(task: Callable[[DictConfig], tuple[dict, dict]]) -> Callable:
    """With ``resume=auto``, a run whose dir records it finished returns the recorded metrics
    (``(metrics, {"cfg": cfg})``) without training; other runs call ``task(cfg)``."""

    @functools.wraps(task)
    def wrap(cfg: DictConfig) -> tuple[dict, dict]:
        record = finished_record(cfg)
        if record is None:
            return task(cfg)
        log.info(
            f"resume=auto: {run_dir(cfg)} already finished (status {record.get('status')}, "
            f"global step {record.get('global_step')}); not training it again"
        )
        metrics = {k: float(v) for k, v in (record.get("metrics") or {}).items()}
        return metrics, {"cfg": cfg}

    return wrap
