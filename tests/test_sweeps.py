"""Multi-run, Optuna, joblib and DDP through the real command line (subprocesses)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml

from latentzoo.collect import summarize
from tests.conftest import TINY, TINY_DATA, TINY_TRAINER, run_cli, run_collect, start_cli

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


# ----------------------------------------------------------------------------- run dirs, resume


def test_runs_started_together_get_their_own_dirs(tmp_path: Path) -> None:
    """Two runs started in the same second: two run dirs, both complete (the old
    <date>_<time> names collided and one run deleted the other's checkpoint)."""
    args = [f"paths.log_dir={tmp_path}", *QUICK, "trainer.max_steps=4"]
    logs = [tmp_path / f"run{i}.log" for i in range(2)]
    procs = [start_cli("train.py", *args, log=log) for log in logs]
    for proc, log in zip(procs, logs, strict=True):
        assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]
    runs = sorted((tmp_path / "train" / "runs").iterdir())
    assert len(runs) == 2, runs
    assert len({run.name[:19] for run in runs}) <= 2  # the readable time stamp is kept
    for run in runs:
        assert json.loads((run / "metrics.json").read_text())["status"] == "completed"
        assert (run / "checkpoints" / "last.ckpt").is_file()


MAX_STEPS = 9
# 9 steps, last.ckpt every 3, slowed down to ~0.15 s a step so the sweep can be killed mid-job
RESUMABLE = [
    *TINY_DATA,
    *[o for o in TINY_TRAINER if "max_steps" not in o and "val_check" not in o],
    f"trainer.max_steps={MAX_STEPS}",
    "trainer.val_check_interval=3",
    "callbacks=model_checkpoint",
    "callbacks.model_checkpoint.every_n_train_steps=3",
    "+callbacks.throttle._target_=tests.throttle.Throttle",
    "+callbacks.throttle.seconds=0.15",
    "test=false",
    "resume=auto",
]


def sweep_args(sweep: Path) -> list[str]:
    return ["-m", "model.beta=1,2,4", f"hydra.sweep.dir={sweep}", *RESUMABLE]


def wait_for(condition, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, "the sweep ended before the state to kill it in"
        assert time.monotonic() < deadline, "timed out waiting for the sweep"
        time.sleep(0.05)


def ckpt_step(path: Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=False)["global_step"])


def assert_same_final_weights(run: Path, reference: Path) -> None:
    """Exact resume: a job killed and resumed ends with the weights of an uninterrupted one."""
    ours = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    theirs = torch.load(reference / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key


@pytest.mark.slow
def test_killed_sweep_resumes_with_resume_auto(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    args = sweep_args(sweep)
    proc = start_cli("train.py", *args, f"paths.log_dir={tmp_path}", log=tmp_path / "killed.log")
    job = [sweep / str(n) for n in range(3)]
    # kill -9 the whole sweep once job 0 finished and job 1 has written a checkpoint (between
    # two checkpoint writes: they come every 3 steps of 0.15 s)
    wait_for(lambda: (job[1] / "checkpoints" / "last.ckpt").is_file(), proc)
    time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = ckpt_step(job[1] / "checkpoints" / "last.ckpt")
    assert 0 < killed_at < MAX_STEPS and not (job[1] / "metrics.json").exists()
    assert json.loads((job[0] / "metrics.json").read_text())["status"] == "completed"
    assert not job[2].exists()
    states = {run.path.name: run.state for run in summarize([sweep]).runs}
    assert states == {"0": "finished", "1": "running or killed"}

    finished = {p: p.stat().st_mtime_ns for p in (job[0] / "metrics.json", *job[0].rglob("*.ckpt"))}
    record0 = (job[0] / "metrics.json").read_text()
    result = run_cli("train.py", *args, f"paths.log_dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stdout + result.stderr
    # job 0 was not trained again: same record, same checkpoint files
    assert f"{job[0]} already finished" in log
    assert {p: p.stat().st_mtime_ns for p in finished} == finished
    assert (job[0] / "metrics.json").read_text() == record0
    # job 1 continued from its own last.ckpt at the step it was killed at
    assert f"continuing this run from its own checkpoint {job[1] / 'checkpoints'}" in log
    assert f"continuing at global step {killed_at}," in log
    for n, resumed in enumerate((0, 1, 0)):
        record = json.loads((job[n] / "metrics.json").read_text())
        assert record["status"] == "completed" and record["global_step"] == MAX_STEPS
        assert ckpt_step(job[n] / "checkpoints" / "last.ckpt") == MAX_STEPS
        history = json.loads((job[n] / "resume.json").read_text())
        assert history["resumed"] == resumed, (n, history)
    states = {run.path.name: run.state for run in summarize([sweep]).runs}
    assert states == {"0": "finished", "1": "finished (resumed 1×)", "2": "finished"}
    done = run_collect(sweep)
    assert done.returncode == 0, done.stderr
    assert "finished (resumed 1×)" in done.stdout

    # and every job ends with the weights of an uninterrupted sweep
    reference = tmp_path / "reference"
    result = run_cli("train.py", *sweep_args(reference), f"paths.log_dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    for n in range(3):
        assert_same_final_weights(job[n], reference / str(n))
