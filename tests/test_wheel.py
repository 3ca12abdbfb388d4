"""The built wheel works without a checkout: its console scripts find the configs shipped as
package data (``latentzoo/configs``), and a user's own config folder goes on top."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

USER_MODEL = """\
# a user's own model config on top of latentzoo's
defaults:
  - beta_vae
  - _self_
latent_dim: 3
"""
USER_EXPERIMENT = """\
# @package _global_
defaults:
  - override /model: my_vae
trainer:
  max_steps: 2
tags: [mine]
"""


def _run(args: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PROJECT_ROOT")}
    env["MPLBACKEND"] = "Agg"
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, (
        f"{' '.join(args)}\n{result.stdout[-3000:]}{result.stderr[-3000:]}"
    )
    return result


def _clean_copy(dest: Path) -> Path:
    """The project's files without build leftovers (a stale ``*.egg-info`` would add files that
    the packaging config itself does not ship)."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):  # not a git checkout
        ignore = shutil.ignore_patterns("build", "dist", "*.egg-info", "__pycache__", ".git")
        shutil.copytree(ROOT, dest, ignore=ignore)
        return dest
    for name in listed:
        if (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    return dest


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv (on top of this interpreter's packages) with only the built wheel added;
    returns its bin dir."""
    base = tmp_path_factory.mktemp("wheel")
    dist = base / "dist"
    source = _clean_copy(base / "source")
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(source),
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(dist),
        ],
        base,
    )
    (wheel,) = dist.glob("latentzoo-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    shipped = {n.removeprefix("latentzoo/configs/") for n in names if "latentzoo/configs/" in n}
    in_repo = {
        str(p.relative_to(ROOT / "configs"))
        for p in (ROOT / "configs").rglob("*.yaml")
        if p.parent.name != "local"
    }
    assert in_repo <= shipped, f"configs missing from the wheel: {sorted(in_repo - shipped)}"
    venv = base / "venv"
    _run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], base)
    bin_dir = venv / "bin"
    _run([str(bin_dir / "python"), "-m", "pip", "install", "--no-deps", "-q", str(wheel)], base)
    return bin_dir


def test_wheel_imports_its_own_copy(installed: Path, tmp_path: Path) -> None:
    out = _run(
        [
            str(installed / "python"),
            "-c",
            "import latentzoo.paths as p; print(p.__file__); print(p.config_dir())",
        ],
        tmp_path,
    ).stdout.split()
    venv = installed.parent.resolve()
    assert Path(out[0]).resolve().is_relative_to(venv)  # not the checkout's src/
    assert Path(out[1]).resolve() == Path(out[0]).resolve().parent / "configs"


def test_wheel_trains_from_an_empty_dir(installed: Path, tmp_path: Path) -> None:
    quick = ["trainer.limit_val_batches=2", "trainer.limit_test_batches=2"]
    _run([str(installed / "latentzoo-train"), "trainer.max_steps=2", *quick], tmp_path)
    (record,) = tmp_path.glob("logs/train/runs/*/metrics.json")
    assert '"completed"' in record.read_text()


def test_user_configs_on_top(installed: Path, tmp_path: Path) -> None:
    mine = tmp_path / "my_configs"
    (mine / "model").mkdir(parents=True)
    (mine / "experiment").mkdir()
    (mine / "model" / "my_vae.yaml").write_text(USER_MODEL)
    (mine / "experiment" / "mine.yaml").write_text(USER_EXPERIMENT)
    train = str(installed / "latentzoo-train")
    job = _run([train, f"--config-dir={mine}", "model=my_vae", "--cfg", "job"], tmp_path).stdout
    assert "latent_dim: 3" in job and "latentzoo.models.BetaVAE" in job
    job = _run(
        [train, f"hydra.searchpath=[file://{mine}]", "experiment=mine", "--cfg", "job"], tmp_path
    ).stdout
    assert "latent_dim: 3" in job and "- mine" in job and "max_steps: 2" in job
