"""Chaos resume: one β-VAE run (tiny, CPU) SIGKILLed N times at random moments (during start-up,
between saves, right as last.ckpt changes, i.e. mid-save) and resumed from last.ckpt each
time. Reports corrupt checkpoints (torch.load fails), steps computed twice, whether the final
weights/EMA/optimizer equal the uninterrupted run bitwise, and the per-checkpoint cost of the
resume state (RNG streams, loader position).

    PYTHONPATH=src python benchmarks/chaos_resume.py --kills 20
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import platform
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.resume_harness import (  # noqa: E402
    Kill,
    differences,
    final_state,
    run_and_kill,
    run_to_end,
)

STEPS = 1500
EVERY = 5
OVERRIDES = [
    "data.dataset.size=small",
    "data.val_size=16",
    "data.test_size=16",
    "data.batch_size=16",
    "trainer.accelerator=cpu",
    "trainer.deterministic=true",
    f"trainer.max_steps={STEPS}",
    "trainer.limit_train_batches=25",
    "trainer.val_check_interval=20",
    "trainer.limit_val_batches=1",
    "trainer.log_every_n_steps=1",
    "+logger.csv.flush_logs_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    f"callbacks.model_checkpoint.every_n_train_steps={EVERY}",
    "callbacks.reconstruction_grid.every_n_steps=20",
    "~callbacks.latent_traversal_grid",
    "~callbacks.rich_progress_bar",
    "~callbacks.rich_model_summary",
    "extras.print_config=false",
    "test=false",
]


def logged_max_step(run_dir: Path) -> int:
    """The highest step any run in ``run_dir`` logged (CSV flushed every step)."""
    best = -1
    for file in (run_dir / "csv").rglob("metrics.csv"):
        with open(file) as f:
            for row in csv.DictReader(f):
                if row.get("train/loss"):
                    best = max(best, int(row["step"]))
    return best + 1  # steps are 0-based in the log: row step s is global step s + 1


def _step(path: Path) -> int:
    return int(torch.load(path, weights_only=False)["global_step"]) if path.exists() else 0


def state_cost(ckpt_path: Path) -> dict[str, float]:
    """Size and save time of what exact resume adds to a checkpoint; per-step capture cost."""
    from latentzoo.callbacks.randomness import capture_rng, restore_rng

    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    added = {
        "callbacks.TrainingRandomness": {
            k: v for k, v in ckpt["callbacks"].items() if k.startswith("TrainingRandomness")
        },
        "loops.fit_loop.combined_loader": ckpt["loops"]["fit_loop"]["state_dict"].get(
            "combined_loader"
        ),
    }
    buf = io.BytesIO()
    t = time.perf_counter()
    for _ in range(20):
        buf.seek(0)
        buf.truncate()
        torch.save(added, buf)
    save_ms = (time.perf_counter() - t) / 20 * 1000
    whole = io.BytesIO()
    torch.save(ckpt, whole)
    state = capture_rng()
    t = time.perf_counter()
    for _ in range(1000):
        state = capture_rng()
        restore_rng(state)
    return {
        "added_bytes": len(buf.getvalue()),
        "added_mb": len(buf.getvalue()) / 2**20,
        "checkpoint_mb": len(whole.getvalue()) / 2**20,
        "added_save_ms": save_ms,
        "per_step_capture_restore_ms": (time.perf_counter() - t),  # 1000 iterations -> ms each
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/chaos_resume.json")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="chaos_resume_"))
    shutil.rmtree(work / "chaos", ignore_errors=True)
    shutil.rmtree(work / "uninterrupted", ignore_errors=True)

    t = time.monotonic()
    run_to_end(work / "uninterrupted", OVERRIDES)
    uninterrupted_s = time.monotonic() - t
    reference = final_state(work / "uninterrupted")

    run_dir, last = work / "chaos", work / "chaos" / "checkpoints" / "last.ckpt"
    attempts, corrupt, recomputed, chaos_t = [], 0, 0, time.monotonic()
    for i in range(args.kills):
        mode = ("startup", "between_saves", "mid_save")[i % 3]
        if mode == "startup":
            kill = Kill(0, rng.uniform(2.0, 6.0))  # seconds after launch: start-up or training
        elif mode == "between_saves":
            kill = Kill(rng.randint(1, 2), rng.uniform(0.0, 0.6))
        else:
            kill = Kill(rng.randint(1, 2), rng.uniform(0.0, 0.01), mid_save=True)
        resumed_from = (
            int(torch.load(last, weights_only=False)["global_step"]) if last.exists() else 0
        )
        before = logged_max_step(run_dir) if run_dir.exists() else 0
        a = run_and_kill(run_dir, OVERRIDES, kill, ckpt=last if last.exists() else None)
        reached = max(logged_max_step(run_dir), before)
        left = a.saved_step if a.saved_step is not None else 0
        if a.corrupt:
            corrupt += 1
            last.unlink()  # nothing to resume from: the next attempt starts over
            left = 0
        recomputed += max(0, reached - left) if a.killed else 0
        attempts.append(
            {
                "mode": mode,
                "kill": vars(kill),
                "killed": a.killed,
                "resumed_from_step": resumed_from,
                "reached_step": reached,
                "last_ckpt_step_after_kill": a.saved_step,
                "corrupt": a.corrupt,
                "seconds": round(a.seconds, 2),
            }
        )
        print(attempts[-1], flush=True)
        if not a.killed and a.saved_step == STEPS:
            break  # the run finished before this kill
    if not (last.exists() and int(torch.load(last, weights_only=False)["global_step"]) == STEPS):
        run_to_end(run_dir, OVERRIDES, ckpt=last if last.exists() else None)
    chaos_s = time.monotonic() - chaos_t
    diff = differences(final_state(run_dir), reference)
    result = {
        "benchmark": "chaos_resume",
        "command": " ".join(["PYTHONPATH=src", "python", *sys.argv]),
        "device": f"CPU ({platform.processor() or platform.machine()}), "
        f"{torch.get_num_threads()} torch threads, torch {torch.__version__}",
        "train_overrides": OVERRIDES,
        "kills_requested": args.kills,
        "kills_landed": sum(a["killed"] for a in attempts),
        "corrupt_checkpoints": corrupt,
        "steps_recomputed": recomputed,
        "final_bitwise_equal": not diff,
        "differences": diff,
        "final_global_step": int(final_state(run_dir)["global_step"]),
        "uninterrupted_seconds": round(uninterrupted_s, 1),
        "chaos_seconds": round(chaos_s, 1),
        "resume_state_cost": state_cost(last),
        "attempts": attempts,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "attempts"}, indent=2))


if __name__ == "__main__":
    main()
