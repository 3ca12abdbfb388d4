"""Where latentzoo finds its configs and its project root."""

from __future__ import annotations

import os
from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parent


def config_dir() -> str:
    """``$LATENTZOO_CONFIG_DIR``, else the repo's ``configs/`` (editable install or checkout)."""
    env = os.environ.get("LATENTZOO_CONFIG_DIR")
    candidates = [Path(env)] if env else []
    candidates += [_PACKAGE_DIR.parents[1] / "configs", _PACKAGE_DIR / "configs"]
    for candidate in candidates:
        if (candidate / "train.yaml").is_file():
            return str(candidate)
    raise FileNotFoundError(
        "latentzoo's configs/ folder was not found (looked in "
        + ", ".join(str(c) for c in candidates)
        + "). Install the repository with `pip install -e .` or set LATENTZOO_CONFIG_DIR."
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
