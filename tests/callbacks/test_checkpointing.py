"""Checkpoints: last.ckpt on a step cadence and on SIGINT/SIGTERM (exact resume command), the best
checkpoint ranked on its own weights, and never a checkpoint with non-finite weights."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from latentzoo.train import train
from latentzoo.utils import NonFiniteLossError
from latentzoo.utils.atomic import TEMP_SUFFIX
from tests.callbacks.ckpt_helpers import read_steps
from tests.conftest import ROOT, TINY, TINY_DATA, TINY_TRAINER, compose_config, run_cli

# a CLI run without images, rich output or test stage, validation far away
QUIET = [
    *TINY_DATA,
    *[o for o in TINY_TRAINER if "max_steps" not in o and "val_check_interval" not in o],
    "callbacks=model_checkpoint",
    "callbacks.model_checkpoint.every_n_minutes=null",
    "trainer.val_check_interval=1000",
    "test=false",
]


def start_train(log_dir: Path, marker: Path, *overrides: str) -> subprocess.Popen:
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "PYTHONWARNINGS": "ignore"}
    args = [
        *QUIET,
        f"paths.log_dir={log_dir}",
        "+callbacks.marker._target_=tests.callbacks.ckpt_helpers.StepMarker",
        f"+callbacks.marker.path={marker}",
        *overrides,
    ]
    return subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_step(process: subprocess.Popen, marker: Path, step: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not any(s >= step for s in read_steps(marker)):
        if process.poll() is not None:
            pytest.fail(f"training ended early:\n{process.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"step {step} not reached in {timeout} s")
        time.sleep(0.05)


def run_dir(log_dir: Path) -> Path:
    (run,) = (log_dir / "train" / "runs").iterdir()
    return run


@pytest.mark.slow
def test_kill_9_keeps_last_checkpoint_of_the_step_cadence(tmp_path: Path) -> None:
    marker = tmp_path / "steps.txt"
    process = start_train(
        tmp_path / "logs",
        marker,
        "trainer.max_steps=1000",
        "callbacks.model_checkpoint.every_n_train_steps=3",
    )
    try:
        wait_for_step(process, marker, 7)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    reached = max(read_steps(marker))
    checkpoints = run_dir(tmp_path / "logs") / "checkpoints"
    last = torch.load(checkpoints / "last.ckpt", weights_only=False)
    # no validation ran; the cadence alone wrote it, at a multiple of 3 not above the step reached
    assert last["global_step"] >= 6 and last["global_step"] % 3 == 0
    assert last["global_step"] <= reached
    assert [p.name for p in checkpoints.glob("*.ckpt")] == ["last.ckpt"]


@pytest.mark.slow
@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
def test_signal_saves_current_step_and_resume_command_continues(tmp_path: Path, signame) -> None:
    marker = tmp_path / "steps.txt"
    process = start_train(
        tmp_path / "logs",
        marker,
        "trainer.max_steps=14",
        "callbacks.model_checkpoint.every_n_train_steps=4",
    )
    try:
        wait_for_step(process, marker, 6)
        process.send_signal(getattr(signal, signame))
        _, stderr = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            process.kill()
    signum = getattr(signal, signame)
    assert process.returncode == 128 + signum, stderr[-3000:]
    reached = max(read_steps(marker))  # the step of the batch during which the signal came
    assert reached < 14, "the run should have stopped early"
    run = run_dir(tmp_path / "logs")
    last_path = run / "checkpoints" / "last.ckpt"
    last = torch.load(last_path, weights_only=False)
    assert last["global_step"] == reached
    assert reached % 4 != 0 or reached > 4  # beyond the last cadence save (step 4)
    record = json.loads((run / "metrics.json").read_text())
    assert record["status"] == "interrupted" and record["global_step"] == reached
    assert record["interrupted_by"] == signame
    command = record["resume_command"]
    assert command in stderr
    assert command.startswith("python train.py ") and command.endswith(f"ckpt_path={last_path}")
    if signame == "SIGTERM":
        return  # the resume is checked once (with SIGINT)

    # a temp file of a killed save next to last.ckpt is removed when the resumed run starts
    stale = last_path.with_name(f".last.ckpt.nohost.1.deadbeef{TEMP_SUFFIX}")
    stale.write_bytes(b"partial")
    args = shlex.split(command)[2:]
    assert f"paths.log_dir={tmp_path / 'logs'}" in args
    marker.unlink()
    resumed = run_cli(
        "train.py",
        *[a for a in args if "paths.log_dir" not in a],
        f"paths.log_dir={tmp_path / 'resumed'}",
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert read_steps(marker)[0] == reached + 1  # continued after the saved step
    new_run = run_dir(tmp_path / "resumed")
    assert (
        torch.load(new_run / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 14
    )
    assert json.loads((new_run / "metrics.json").read_text())["status"] == "completed"
    assert not stale.exists()


@pytest.mark.slow
def test_sigterm_to_rank_0_stops_all_ddp_ranks_at_one_step(tmp_path: Path) -> None:
    """Only the launching process (rank 0) gets the signal: both ranks agree to save at the same
    step (``trainer.save_checkpoint`` runs on every rank, else they would hang) and stop."""
    marker = tmp_path / "steps.txt"
    process = start_train(
        tmp_path / "logs",
        marker,
        "trainer=ddp_sim",
        "trainer.max_steps=40",
        "callbacks.model_checkpoint.every_n_train_steps=100",
    )
    try:
        wait_for_step(process, marker, 3)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    reached = max(read_steps(marker))  # both ranks write their steps here
    assert reached < 40
    run = run_dir(tmp_path / "logs")
    assert (
        torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == reached
    )
    record = json.loads((run / "metrics.json").read_text())
    assert record["status"] == "interrupted" and record["global_step"] == reached


@pytest.mark.slow
def test_best_checkpoint_score_belongs_to_its_weights(tmp_path: Path) -> None:
    overrides = [o for o in TINY_TRAINER if "max_steps" not in o and "val_check_interval" not in o]
    cfg = compose_config(
        "train",
        [
            *TINY_DATA,
            *overrides,
            "callbacks=model_checkpoint",
            "trainer.max_steps=9",
            "trainer.val_check_interval=3",
            "callbacks.model_checkpoint.every_n_train_steps=1",  # last.ckpt at every step
            "+callbacks.seed_val._target_=tests.callbacks.ckpt_helpers.SeedValidation",
        ],
        tmp_path,
    )
    metrics, objects = train(cfg)
    trainer, model, datamodule = objects["trainer"], objects["model"], objects["datamodule"]
    callback = trainer.checkpoint_callback
    best = callback.best_model_path
    assert torch.load(best, weights_only=False)["global_step"] in {3, 6, 9}  # validated steps
    (validated,) = trainer.validate(
        model, datamodule=datamodule, ckpt_path=best, weights_only=False
    )
    assert validated["val/loss"] == pytest.approx(float(callback.best_model_score), rel=1e-5)
    # the test stage of train() ran on that best checkpoint
    (tested,) = trainer.test(model, datamodule=datamodule, ckpt_path=best, weights_only=False)
    assert metrics["test/loss"] == pytest.approx(tested["test/loss"], rel=1e-5)
    record = json.loads((tmp_path / "metrics.json").read_text())
    assert record["best_model_path"] == best


def test_nonfinite_weights_are_never_saved(tmp_path: Path) -> None:
    cfg = compose_config(
        "train",
        [
            *TINY,
            "trainer.max_steps=6",
            "callbacks.model_checkpoint.every_n_train_steps=1",
            "+callbacks.poison._target_=tests.callbacks.ckpt_helpers.PoisonWeights",
            "+callbacks.poison.at_step=3",  # after step 3 (before its checkpoint) a weight is NaN
        ],
        tmp_path,
    )
    with pytest.raises(NonFiniteLossError) as raised:
        train(cfg)
    checkpoints = sorted((tmp_path / "checkpoints").glob("*.ckpt"))
    assert checkpoints
    for path in checkpoints:
        checkpoint = torch.load(path, weights_only=False)
        assert checkpoint["global_step"] <= 2, path
        for name, tensor in checkpoint["state_dict"].items():
            assert torch.isfinite(tensor).all(), f"{path.name}: {name}"
    last = tmp_path / "checkpoints" / "last.ckpt"
    message = str(raised.value)
    assert f"The last finite checkpoint is {last} (global step 2)" in message
    assert f"ckpt_path={last}" in message
    assert list(tmp_path.rglob(f"*{TEMP_SUFFIX}")) == []
