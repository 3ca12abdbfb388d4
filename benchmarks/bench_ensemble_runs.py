"""Whole runs through the CLI: one K-member ensemble vs K single runs, one after another or
``--parallel P`` at a time (processes sharing the device).

Every job is ``python train.py experiment=beta_vae_proc_dsprites trainer.max_steps=N`` with the
same overrides (no validation or test, a final ``last.ckpt``, CSV logs); the ensemble adds
``ensemble.seeds=range(K)``, the single runs ``seed=s``. The figure is wall-clock time from the
first process's start to the last one's end, so process start-up, Lightning, data loading and
checkpoint writing count on both sides: images/s = K · N · batch / wall.

It also tabulates both sides with ``python -m latentzoo.collect`` (the ensemble's ``members/``
and the one-at-a-time single runs): n and mean ± std of every final metric, which should agree
to float tolerance, since member k is the single run ``seed=k``.

Usage::

    python benchmarks/bench_ensemble_runs.py --k 8 --steps 50 [--parallel 1 4] [--device cpu]
        [--out benchmarks/results/ensemble_runs_cpu.json]
    python benchmarks/bench_ensemble_runs.py --device gpu --k 16 --steps 500 --parallel 1 4 \
        --out benchmarks/results/ensemble_runs_h100.json     # the issue's GPU targets
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
BATCH = 64  # experiment=beta_vae_proc_dsprites: data.global_batch_size=64


def overrides(steps: int, device: str) -> list[str]:
    return [
        "experiment=beta_vae_proc_dsprites",
        f"trainer.accelerator={device}",
        f"trainer.max_steps={steps}",
        "trainer.val_check_interval=null",
        "trainer.limit_val_batches=0",
        "trainer.enable_progress_bar=false",
        "extras.print_config=false",
        "test=false",
        "callbacks=none",
        "+callbacks.model_checkpoint._target_=latentzoo.callbacks.Checkpoints",
        "+callbacks.model_checkpoint.dirpath=${paths.output_dir}/checkpoints",
        "+callbacks.model_checkpoint.save_last=true",
        "+callbacks.model_checkpoint.every_n_train_steps=null",
    ]


def run_jobs(jobs: list[list[str]], parallel: int) -> float:
    """Wall seconds for ``jobs`` (train.py argument lists), ``parallel`` at a time."""
    start = time.perf_counter()
    pending, running = list(jobs), []
    while pending or running:
        while pending and len(running) < parallel:
            args = pending.pop(0)
            running.append(
                subprocess.Popen(
                    [sys.executable, str(ROOT / "train.py"), *args],
                    cwd=ROOT,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                    text=True,
                )
            )
        for proc in list(running):
            if proc.poll() is not None:
                running.remove(proc)
                if proc.returncode != 0:
                    raise RuntimeError(f"a run failed:\n{proc.stderr.read()[-3000:]}")
        time.sleep(0.05)
    return time.perf_counter() - start


def collect(runs: Path, out: Path) -> dict:
    """``latentzoo.collect``'s JSON table of the runs under ``runs``."""
    subprocess.run(
        [sys.executable, "-m", "latentzoo.collect", str(runs), "--out", str(out)],
        cwd=ROOT,
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return json.loads(out.with_suffix(".json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--parallel", type=int, nargs="+", default=[1])
    parser.add_argument("--device", default="cpu", choices=["cpu", "gpu"])
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/ensemble_runs_cpu.json"))
    args = parser.parse_args()
    common = overrides(args.steps, args.device)
    images = args.k * args.steps * BATCH
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_ensemble_runs_") as tmp:
        ensemble = [*common, f"ensemble.seeds=range({args.k})", f"hydra.run.dir={tmp}/ensemble"]
        wall = run_jobs([ensemble], 1)
        rows.append({"what": f"1 ensemble of {args.k}", "wall_s": round(wall, 2)})
        print(json.dumps(rows[-1]), flush=True)
        for parallel in args.parallel:
            singles = [
                [*common, f"seed={s}", f"hydra.run.dir={tmp}/singles_p{parallel}/seed_{s}"]
                for s in range(args.k)
            ]
            wall = run_jobs(singles, parallel)
            rows.append(
                {"what": f"{args.k} single runs, {parallel} at a time", "wall_s": round(wall, 2)}
            )
            print(json.dumps(rows[-1]), flush=True)
        tables = {
            "ensemble_members": collect(Path(tmp, "ensemble", "members"), Path(tmp, "t_ens")),
            "single_runs": collect(Path(tmp, f"singles_p{args.parallel[0]}"), Path(tmp, "t_one")),
        }
    for row in rows:
        row["images_per_s"] = round(images / row["wall_s"], 1)
        row["ensemble_speedup"] = round(row["wall_s"] / rows[0]["wall_s"], 3)
    result = {
        "benchmark": "bench_ensemble_runs",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "device": torch.cuda.get_device_name(0) if args.device == "gpu" else "cpu",
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "members": args.k,
        "steps": args.steps,
        "batch_per_member": BATCH,
        "rows": rows,
        "collect": tables,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
