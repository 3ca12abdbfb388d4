"""Run dir names (latentzoo.paths.run_id) and resume=auto (latentzoo.utils.resume) without
training; tests/test_sweeps.py kills and resumes real sweeps."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import open_dict

from latentzoo.collect import read_run
from latentzoo.paths import run_id, run_suffix
from latentzoo.utils import LatentzooError
from latentzoo.utils.resume import checkpoint_to_resume, resume_mode, skip_finished
from tests.conftest import TINY, compose_config, run_collect

STAMP = r"\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d"


def test_run_suffix_slurm_and_local() -> None:
    pid = os.getpid()
    assert run_suffix({"SLURM_JOB_ID": "77"}) == f"j77-{pid}"
    array = {"SLURM_JOB_ID": "78", "SLURM_ARRAY_JOB_ID": "70", "SLURM_ARRAY_TASK_ID": "3"}
    assert run_suffix(array) == f"j70_3-{pid}"
    # srun starts one process per DDP rank: they share the job's name
    assert run_suffix({**array, "SLURM_NTASKS": "4"}) == "j70_3"
    local = {run_suffix({}) for _ in range(20)}
    assert len(local) == 20 and all(re.fullmatch(rf"{pid}-[0-9a-f]{{4}}", s) for s in local)


def test_run_id_is_unique_per_process_and_fixed_within_one() -> None:
    code = "from latentzoo.paths import run_id; print(run_id(), run_id())"
    procs = [
        subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    ids = []
    for proc in procs:
        first, second = proc.communicate(timeout=60)[0].split()
        assert first == second
        ids.append(first)
    assert len(set(ids)) == 3, ids
    assert all(re.fullmatch(rf"{STAMP}_\d+-[0-9a-f]{{4}}", i) for i in ids), ids


def test_run_and_sweep_dirs_carry_the_run_id(tmp_path: Path) -> None:
    cfg = compose_config("train", [f"paths.log_dir={tmp_path}"])
    assert cfg.hydra.run.dir == f"{tmp_path}/train/runs/{run_id()}"
    assert cfg.hydra.sweep.dir == f"{tmp_path}/train/multiruns/{run_id()}"
    # an explicit dir (what Lightning gives DDP ranks, or a resumable run) wins
    fixed = compose_config("train", ["hydra.run.dir=/some/where"])
    assert fixed.hydra.run.dir == "/some/where"
    assert compose_config("eval", []).hydra.run.dir.endswith(f"/eval/runs/{run_id()}")


def test_resume_mode_values(tmp_path: Path) -> None:
    for value, mode in (("auto", "auto"), ("off", "off"), ("false", "off"), ("null", "off")):
        assert resume_mode(compose_config("train", [f"resume={value}"])) == mode
    assert resume_mode(compose_config("train", [])) == "off"  # the default
    with pytest.raises(LatentzooError, match="resume=sometimes"):
        resume_mode(compose_config("train", ["resume=sometimes"]))


def resumable_cfg(run: Path, *overrides: str):
    return compose_config("train", [*TINY, "resume=auto", *overrides], run)


def fake_last(run: Path) -> Path:
    last = run / "checkpoints" / "last.ckpt"
    last.parent.mkdir(parents=True, exist_ok=True)
    last.write_bytes(b"not read here")
    return last


def test_resume_auto_picks_the_own_last_checkpoint(tmp_path: Path) -> None:
    cfg = resumable_cfg(tmp_path)
    assert checkpoint_to_resume(cfg) is None  # nothing yet: start
    last = fake_last(tmp_path)
    (tmp_path / "metrics.json").write_text(json.dumps({"status": "interrupted"}))
    assert checkpoint_to_resume(cfg) == str(last)
    history = json.loads((tmp_path / "resume.json").read_text())
    assert history["resumed"] == 1 and len(history["starts"]) == 2
    assert history["starts"][1]["previous_status"] == "interrupted"
    assert not (tmp_path / "metrics.json").exists()  # the earlier attempt's record is cleared
    # resume off (the default) starts over, or from ckpt_path
    plain = compose_config("train", [*TINY, "ckpt_path=/elsewhere/x.ckpt"], tmp_path)
    assert checkpoint_to_resume(plain) == "/elsewhere/x.ckpt"
    with open_dict(plain):
        plain.ckpt_path = None
    assert checkpoint_to_resume(plain) is None


def test_resume_auto_follows_the_checkpoint_callback_dirpath(tmp_path: Path) -> None:
    cfg = resumable_cfg(tmp_path, f"callbacks.model_checkpoint.dirpath={tmp_path}/ck")
    last = tmp_path / "ck" / "last.ckpt"
    last.parent.mkdir()
    last.write_bytes(b"x")
    assert checkpoint_to_resume(cfg) == str(last)


def test_resume_auto_refuses_a_dir_of_another_job(tmp_path: Path) -> None:
    checkpoint_to_resume(resumable_cfg(tmp_path, "model.beta=1"))
    fake_last(tmp_path)
    with pytest.raises(LatentzooError, match="belongs to a job with overrides"):
        checkpoint_to_resume(resumable_cfg(tmp_path, "model.beta=2"))
    assert checkpoint_to_resume(resumable_cfg(tmp_path, "model.beta=1"))  # the same job


def test_finished_run_is_not_trained_again(tmp_path: Path) -> None:
    calls = []

    @skip_finished
    def task(cfg):
        calls.append(cfg)
        return {"val/loss": 9.0}, {}

    record = {"status": "completed", "global_step": 4, "metrics": {"val/loss": 1.5}}
    (tmp_path / "metrics.json").write_text(json.dumps(record))
    metrics, objects = task(resumable_cfg(tmp_path))
    assert metrics == {"val/loss": 1.5} and not calls  # the recorded value, for the sweeper
    task(compose_config("train", TINY, tmp_path))  # resume off: trains
    (tmp_path / "metrics.json").write_text(json.dumps({**record, "status": "failed"}))
    task(resumable_cfg(tmp_path))  # failed: trains (resumes) again
    assert len(calls) == 2


def test_collect_states(tmp_path: Path) -> None:
    def run(name: str, record: dict | None, resumed: int = 0) -> Path:
        path = tmp_path / name
        (path / ".hydra").mkdir(parents=True)
        (path / ".hydra" / "overrides.yaml").write_text("- seed=1\n")
        if record is not None:
            (path / "metrics.json").write_text(json.dumps(record))
        (path / "resume.json").write_text(json.dumps({"resumed": resumed}))
        return path

    done = {"status": "completed", "metrics": {"val/loss": 1.0}}
    assert read_run(run("a", done)).state == "finished"
    assert read_run(run("b", done, resumed=2)).state == "finished (resumed 2×)"
    assert read_run(run("c", {"status": "failed", "error": "x"})).state == "failed"
    assert read_run(run("d", {"status": "interrupted"}, 1)).state == "interrupted (resumed 1×)"
    assert read_run(run("e", None, resumed=1)).state == "running or killed (resumed 1×)"


def test_collect_cli_prints_states(tmp_path: Path) -> None:
    for name, record in (("0", {"status": "completed", "metrics": {"val/loss": 2.5}}), ("1", None)):
        path = tmp_path / name
        (path / ".hydra").mkdir(parents=True)
        (path / ".hydra" / "overrides.yaml").write_text(f"- seed={name}\n")
        if record:
            (path / "metrics.json").write_text(json.dumps(record))
    done = run_collect(tmp_path)
    assert done.returncode == 0, done.stderr
    rows = [line for line in done.stdout.splitlines() if "finished" in line or "killed" in line]
    assert any("finished" in r and "2.5" in r for r in rows), done.stdout
    assert any("running or killed" in r for r in rows), done.stdout
