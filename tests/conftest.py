"""Shared fixtures: composed configs for tiny CPU runs, and a helper to run the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from latentzoo.paths import config_dir

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("PROJECT_ROOT", str(ROOT))

# A tiny run: the small dSprites grid, small splits and batches, a few steps, no rich output.
TINY_DATA = [
    "data.dataset.size=small",
    "data.val_size=32",
    "data.test_size=32",
    "data.batch_size=8",
]
TINY_TRAINER = [
    "trainer.accelerator=cpu",
    "trainer.max_steps=4",
    "trainer.val_check_interval=2",
    "trainer.limit_val_batches=2",
    "trainer.limit_test_batches=2",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "extras.print_config=false",
]
TINY = [
    *TINY_DATA,
    *TINY_TRAINER,
    "~callbacks.rich_progress_bar",
    "~callbacks.rich_model_summary",
    "callbacks.reconstruction_grid.every_n_steps=2",
    "callbacks.latent_traversal_grid.every_n_steps=2",
]


# NFPI at toy size on scikit-learn's digits: one flow level, EMA from the first epoch
TINY_NFPI = [
    "experiment=nfpi_digits",
    "data.image_size=8",
    "data.batch_size=16",
    "model.flow.levels=1",
    "model.flow.steps=[1]",
    "model.flow.blocks=[1]",
    "model.flow.hidden=8",
    "model.init_images=32",
    "model.ema_start_epoch=0",
    "model.final_grid_temperatures=null",
]


def compose_config(
    config_name: str, overrides: list[str], output_dir: Path | None = None
) -> DictConfig:
    """Compose ``configs/<config_name>.yaml`` as the CLI would, with Hydra's runtime set."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=overrides, return_hydra_config=True)
    if output_dir is not None:
        with open_dict(cfg):
            cfg.paths.output_dir = str(output_dir)
            cfg.paths.log_dir = str(output_dir)
            cfg.hydra.runtime.output_dir = str(output_dir)
            cfg.hydra.job.num = 0
            cfg.hydra.job.id = 0
    HydraConfig().set_config(cfg)
    return cfg


@pytest.fixture
def tiny_train_cfg(tmp_path: Path) -> DictConfig:
    return compose_config("train", TINY, tmp_path)


CLI_ENV = {"HYDRA_FULL_ERROR": "0", "PYTHONWARNINGS": "ignore"}


def run_cli(script: str, *args: str, cwd: Path = ROOT, timeout: int = 600):
    """Run ``python <script> args...`` the way a user would; returns the CompletedProcess."""
    env = {**os.environ, **CLI_ENV}
    return subprocess.run(
        [sys.executable, str(ROOT / script), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def start_cli(script: str, *args: str, log: Path, cwd: Path = ROOT) -> subprocess.Popen:
    """Start ``python <script> args...`` in its own process group (``os.killpg`` stops it and
    its children), its stdout and stderr going to the file ``log``."""
    with log.open("w") as out:
        return subprocess.Popen(
            [sys.executable, str(ROOT / script), *args],
            cwd=cwd,
            env={**os.environ, **CLI_ENV},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def run_collect(*paths: Path) -> subprocess.CompletedProcess:
    """``python -m latentzoo.collect paths...`` with a wide terminal (no wrapped tables)."""
    return subprocess.run(
        [sys.executable, "-m", "latentzoo.collect", *map(str, paths)],
        cwd=ROOT,
        env={**os.environ, "COLUMNS": "200"},
        capture_output=True,
        text=True,
        timeout=120,
    )
