"""Multi-run, Optuna, joblib and DDP through the real command line (subprocesses)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.conftest import TINY, TINY_DATA, TINY_TRAINER, run_cli

# Sweeps don't need images or test loops to check the plumbing.
QUICK = [
    *TINY_DATA,
    *[o for o in TINY_TRAINER if "max_steps" not in o],
    "callbacks=model_checkpoint",
    "test=false",
    "trainer.max_steps=2",
]


def multirun_dirs(log_dir: Path) -> list[Path]:
    return sorted((log_dir / "train" / "multiruns").iterdir())


def test_multirun_grid(tmp_path: Path) -> None:
    result = run_cli(
        "train.py", "-m", "model.beta=1,4", "seed=0,1", f"paths.log_dir={tmp_path}", *QUICK
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (sweep,) = multirun_dirs(tmp_path)
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert jobs == ["0", "1", "2", "3"]
    overrides = {
        tuple(yaml.safe_load((sweep / j / ".hydra" / "overrides.yaml").read_text())) for j in jobs
    }
    assert len(overrides) == 4
    for job in jobs:
        assert (sweep / job / "checkpoints" / "last.ckpt").is_file()


def test_optuna_search_optimises_returned_metric(tmp_path: Path) -> None:
    result = run_cli(
        "train.py",
        "-m",
        "hparams_search=beta_vae_optuna",
        "hydra.sweeper.n_trials=2",
        "hydra.sweeper.sampler.n_startup_trials=1",
        f"paths.log_dir={tmp_path}",
        *QUICK,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (sweep,) = multirun_dirs(tmp_path)
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert set(best["best_params"]) == {"model.beta", "model.optimizer.lr"}
    assert 0 < best["best_value"] < 1e6  # a real val/loss came back from the task


@pytest.mark.slow
def test_joblib_launcher_runs_jobs_in_parallel(tmp_path: Path) -> None:
    result = run_cli(
        "train.py",
        "-m",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        "seed=0,1",
        f"paths.log_dir={tmp_path}",
        *QUICK,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (sweep,) = multirun_dirs(tmp_path)
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1"]
    assert "Joblib" in (result.stdout + result.stderr)


@pytest.mark.slow
def test_ddp_sim_two_processes_one_run_dir(tmp_path: Path) -> None:
    result = run_cli(
        "train.py",
        "trainer=ddp_sim",
        f"paths.log_dir={tmp_path}",
        *[o for o in TINY if "max_steps" not in o],
        "trainer.max_steps=4",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    runs = list((tmp_path / "train" / "runs").iterdir())
    assert len(runs) == 1, runs
    checkpoints = runs[0] / "checkpoints"
    assert (checkpoints / "last.ckpt").is_file()
    assert len(list(checkpoints.glob("step_*.ckpt"))) == 1
    output = result.stdout + result.stderr
    assert "distributed_backend=gloo" in output
    assert "MEMBER: 2/2" in output  # the second process joined the process group
