"""Where latentzoo finds its configs and its project root, and how its run dirs are named."""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Mapping
from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parent


def config_dir() -> str:
    """Where the configs are: ``$LATENTZOO_CONFIG_DIR``, else the checkout's ``configs/`` (repo
    scripts, tests, an editable install), else the copy shipped in the package
    (``latentzoo/configs``, from a wheel or ``pip install .``).

    A user's own configs go on top without editing these: ``latentzoo-train
    --config-dir=<dir> model=<my_model>`` or ``hydra.searchpath=[file://<dir>]``.
    """
    env = os.environ.get("LATENTZOO_CONFIG_DIR")
    candidates = [Path(env)] if env else []
    candidates += [_PACKAGE_DIR.parents[1] / "configs", _PACKAGE_DIR / "configs"]
    for candidate in candidates:
        if (candidate / "train.yaml").is_file():
            return str(candidate)
    raise FileNotFoundError(
        "latentzoo's configs were not found (looked in "
        + ", ".join(str(c) for c in candidates)
        + "). Reinstall latentzoo (its wheel ships latentzoo/configs) or set LATENTZOO_CONFIG_DIR."
    )


def setup_project_root() -> None:
    """Set ``PROJECT_ROOT`` (used by ``paths.root_dir``) if the root scripts did not.

    The console scripts use the nearest folder above the working directory that holds a
    ``.project-root`` marker, else the working directory itself.
    """
    if "PROJECT_ROOT" in os.environ:
        return
    cwd = Path.cwd()
    root = next((p for p in (cwd, *cwd.parents) if (p / ".project-root").exists()), cwd)
    os.environ["PROJECT_ROOT"] = str(root)


_RUN_ID: str | None = None


def run_suffix(environ: Mapping[str, str] | None = None) -> str:
    """What makes a run dir name unique besides its time stamp.

    Outside SLURM: the process id and random hex digits, so runs started in the same second,
    also on other machines, never share a dir. In a SLURM array task ``j<array job id>_<task
    id>``, in another SLURM job ``j<job id>``; with one SLURM task per job the process id
    follows (``-<pid>``: runs started side by side in one job script stay apart). With several
    tasks (``srun`` starting one process per DDP rank) the ranks must share the dir, so the
    name is the job's alone: start independent runs as separate jobs or array tasks there.
    """
    environ = os.environ if environ is None else environ
    array_job, task = environ.get("SLURM_ARRAY_JOB_ID"), environ.get("SLURM_ARRAY_TASK_ID")
    if array_job and task:
        suffix = f"j{array_job}_{task}"
    elif environ.get("SLURM_JOB_ID"):
        suffix = f"j{environ['SLURM_JOB_ID']}"
    else:
        return f"{os.getpid()}-{secrets.token_hex(2)}"
    if environ.get("SLURM_NTASKS", "1") == "1":
        suffix += f"-{os.getpid()}"
    return suffix


def run_id() -> str:
    """This process's run id, ``<date>_<time>_<suffix>`` (see :func:`run_suffix`): the name of
    its run dir or sweep dir (``${latentzoo.run_id:}`` in configs/hydra/default.yaml).

    Fixed once per process, so every resolution of the run dir agrees. Under SLURM the time is
    the job's start time when SLURM gives it, so the ranks of one job that srun starts agree
    too. DDP ranks that Lightning starts itself get the run dir of rank 0 on their command line.
    """
    global _RUN_ID
    if _RUN_ID is None:
        start = os.environ.get("SLURM_JOB_START_TIME", "")
        seconds = float(start) if start.isdigit() else time.time()
        stamp = time.strftime("%Y-%m-%d_%H-%M-%S", time.localtime(seconds))
        _RUN_ID = f"{stamp}_{run_suffix()}"
    return _RUN_ID
