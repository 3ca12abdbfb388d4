"""Kill-and-resume through the real CLI: run a training uninterrupted, run it again killed with
SIGKILL at random moments and resumed from ``last.ckpt`` each time, and compare the final
weights bit for bit. Shared by ``tests/test_exact_resume.py`` and
``benchmarks/chaos_resume.py``."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    env = {**os.environ, "HYDRA_FULL_ERROR": "1", "PYTHONWARNINGS": "ignore"}
    env.setdefault("PROJECT_ROOT", str(ROOT))
    return env


def train_command(run_dir: Path, overrides: list[str], ckpt: Path | None = None) -> list[str]:
    args = [sys.executable, str(ROOT / "train.py"), f"hydra.run.dir={run_dir}", *overrides]
    if ckpt is not None:
        args.append(f"ckpt_path={ckpt}")
    return args


def run_to_end(run_dir: Path, overrides: list[str], ckpt: Path | None = None, timeout=900) -> None:
    """One training run to its end; raises with the run's output tail if it failed."""
    proc = subprocess.run(
        train_command(run_dir, overrides, ckpt),
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"training failed ({proc.returncode}):\n{proc.stderr[-4000:]}")


def loadable(path: Path) -> bool:
    try:
        torch.load(path, map_location="cpu", weights_only=False)
        return True
    except Exception:
        return False


@dataclass
class Kill:
    """When to kill: after ``after_saves`` new versions of last.ckpt appeared, wait ``delay``
    seconds (``mid_save``: count a version as soon as the file changes, without waiting for it
    to be whole; ``after_saves=0``: ``delay`` seconds after the start)."""

    after_saves: int
    delay: float = 0.0
    mid_save: bool = False


@dataclass
class Attempt:
    killed: bool
    saved_step: int | None  # global step of the last.ckpt left behind (None: none/corrupt)
    corrupt: bool
    seconds: float


def run_and_kill(
    run_dir: Path,
    overrides: list[str],
    kill: Kill,
    ckpt: Path | None = None,
    timeout=900,
    last_name: str = "last.ckpt",
) -> Attempt:
    """Start a run (resuming from ``ckpt``), SIGKILL it as ``kill`` says; report what is left.
    ``last_name``: the run's own checkpoint in ``checkpoints/`` (an ensemble's is
    ``ensemble_last.ckpt``)."""
    last = run_dir / "checkpoints" / last_name
    seen = last.stat().st_mtime_ns if last.exists() else None
    start = time.monotonic()
    run_dir.mkdir(parents=True, exist_ok=True)
    log = open(run_dir / "killed_run.stderr", "w")  # noqa: SIM115
    proc = subprocess.Popen(
        train_command(run_dir, overrides, ckpt),
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=log,
        start_new_session=True,  # kill -9 the whole job (DDP ranks are its children)
    )
    saves, killed = 0, False
    try:
        if kill.after_saves == 0:  # a moment after the start, whatever the run is doing
            time.sleep(kill.delay)
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                killed = True
        while not killed and proc.poll() is None and time.monotonic() - start < timeout:
            mtime = last.stat().st_mtime_ns if last.exists() else None
            if mtime is not None and mtime != seen:
                seen = mtime
                if kill.mid_save or loadable(last):
                    saves += 1
                if saves >= kill.after_saves:
                    time.sleep(kill.delay)
                    if proc.poll() is None:
                        os.killpg(proc.pid, signal.SIGKILL)
                        killed = True
                    break
            time.sleep(0.002)
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    log.close()
    err = (run_dir / "killed_run.stderr").read_text()
    if not killed and proc.returncode != 0:
        raise RuntimeError(f"training failed ({proc.returncode}):\n{err[-4000:]}")
    corrupt = last.exists() and not loadable(last)
    step = None
    if last.exists() and not corrupt:
        step = int(torch.load(last, map_location="cpu", weights_only=False)["global_step"])
    return Attempt(killed, step, corrupt, time.monotonic() - start)


def final_state(run_dir: Path) -> dict[str, Any]:
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    fit = ckpt["loops"]["fit_loop"]
    return {
        "global_step": ckpt["global_step"],
        "epoch": ckpt["epoch"],
        "state_dict": ckpt["state_dict"],
        "ema": ckpt.get("ema"),
        "optimizer_states": ckpt.get("optimizer_states"),
        "lr_schedulers": ckpt.get("lr_schedulers"),
        # counters: epoch and batch progress, logging step, the loader's position
        "fit_loop": {
            # epochs done ("processed", "completed"); "ready"/"started" count how often an
            # epoch was entered, and a run resumed in the epoch's last step enters it again
            "epoch_progress": _only(fit["epoch_progress"], ("processed", "completed")),
            # without "completed": a save in on_train_batch_end holds processed - 1 there, one
            # after fit (train.save_final_last) holds processed; Lightning's restart treats
            # both alike. Which of the two writes the final last.ckpt depends on the
            # ModelCheckpoint bookkeeping of that process, not on the training state.
            "batch_progress": _without_completed(fit["epoch_loop.batch_progress"]),
            "batches_that_stepped": fit["epoch_loop.state_dict"]["_batches_that_stepped"],
            "combined_loader": fit["state_dict"].get("combined_loader"),
        },
    }


def _only(progress: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    return {
        k: ({kk: vv for kk, vv in v.items() if kk in keys} if isinstance(v, dict) else v)
        for k, v in progress.items()
    }


def _without_completed(progress: dict[str, Any]) -> dict[str, Any]:
    return {
        k: ({kk: vv for kk, vv in v.items() if kk != "completed"} if isinstance(v, dict) else v)
        for k, v in progress.items()
    }


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    if isinstance(obj, (list, tuple)):
        out = {}
        for i, v in enumerate(obj):
            out.update(_flatten(v, f"{prefix}{i}."))
        return out
    return {prefix.rstrip("."): obj}


def differences(a: dict[str, Any], b: dict[str, Any]) -> dict[str, float]:
    """Entries of two final states that are not bitwise equal -> max abs difference (inf when
    shapes or keys differ)."""
    fa, fb = _flatten(a), _flatten(b)
    out: dict[str, float] = {}
    for key in sorted(set(fa) | set(fb)):
        x, y = fa.get(key), fb.get(key)
        if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
            if x.shape != y.shape or x.dtype != y.dtype:
                out[key] = float("inf")
            elif not torch.equal(x, y):
                out[key] = float((x.double() - y.double()).abs().max())
        elif x != y:
            out[key] = float("inf")
    return out


@dataclass
class ChaosResult:
    attempts: list[Attempt] = field(default_factory=list)
    differences: dict[str, float] = field(default_factory=dict)
    steps_recomputed: int = 0


def kill_and_resume(
    run_dir: Path,
    overrides: list[str],
    kills: list[Kill],
    reference: dict[str, Any] | None = None,
    last_name: str = "last.ckpt",
) -> ChaosResult:
    """Run killed at each of ``kills`` and resumed from last.ckpt after each; then to the end.

    ``steps_recomputed``: steps trained twice (the kill came after the step of last.ckpt).
    """
    result = ChaosResult()
    last = run_dir / "checkpoints" / last_name
    for kill in kills:
        resume = last if last.exists() else None
        attempt = run_and_kill(run_dir, overrides, kill, ckpt=resume, last_name=last_name)
        result.attempts.append(attempt)
        if attempt.corrupt:
            raise RuntimeError(f"corrupt checkpoint after a kill: {last}")
    run_to_end(run_dir, overrides, ckpt=last if last.exists() else None)
    if reference is not None:
        result.differences = differences(final_state(run_dir), reference)
    return result


def _step_of(path: Path) -> int | None:
    if not path.exists():
        return None
    return int(torch.load(path, map_location="cpu", weights_only=False)["global_step"])
