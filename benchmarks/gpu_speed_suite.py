"""Every GPU measurement of issue 19 ("Speed"), in one run that fits a ~15-minute GPU lease.

Each item is a subprocess with its own time limit that writes its own JSON to
``benchmarks/results/``; this script then writes ``gpu_speed_suite_<gpu>.json`` with, per item,
the command, exit code, seconds and the item's JSON (or the tail of its output when it failed).
Rerun only what failed with ``--only <item> ...``; ``--list`` shows the items.

Items (target of the issue in brackets):

- ``vae_eager``, ``vae_compile``, ``vae_cudagraphs``: β-VAE, β-TCVAE, FactorVAE, Lie VAE at
  batch 64, Lightning vs a bare loop (bench_vae_train_step), eager / ``model.compile=default``
  / ``reduce-overhead`` [target 2: ≤ 1.05× bare];
- ``train_overhead_gpu``: the real ``train()`` (default datamodule with its prefetch thread,
  default callbacks) vs a bare loop on the same batches, on the GPU [target 2];
- ``gpu_correctness``: proc_dsprites rendered on the GPU equals the CPU renderer pixel for
  pixel; compiled β-VAE / FactorVAE steps equal eager (tests, run on the GPU machine);
- ``host_syncs``: the latent_fm DiT step under ``torch.cuda.set_sync_debug_mode("error")``
  (after the first batch, no step may synchronise) [target 3];
- ``dit_eager``, ``dit_compile``: DiT-S/2, B/2, L/2, XL/2 bf16 training throughput and MFU
  (bench_latent_fm; FLOPs by torch's flop counter), eager and compiled, fused AdamW
  [target 3: B/2 ≥ 35 % MFU].

Usage (on the GPU machine, from the repo root)::

    PYTHONPATH=src python benchmarks/gpu_speed_suite.py   # all (limits sum to 15.5 min)
    PYTHONPATH=src python benchmarks/gpu_speed_suite.py --only dit_compile
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PY = sys.executable
VAE = [PY, "benchmarks/bench_vae_train_step.py", "--device", "cuda", "--batch-size", "64"]
VAE_STEPS = ["--steps", "150", "--warmup", "40", "--repeats", "2"]
DIT = [PY, "benchmarks/bench_latent_fm.py", "--precision", "bf16-mixed", "--no-sampling"]
DIT_MODELS = ["--models", "dit_s2", "dit_b2", "dit_l2", "dit_xl2", "--batch", "256"]

HOST_SYNC_CHECK = r"""
import torch
from hydra.utils import instantiate
from tests.conftest import compose_config
cfg = compose_config("train", ["experiment=latent_fm_proc_blobs", "model/backbone=dit_tiny",
    "model/autoencoder=identity", "data.image_size=32"])
model = instantiate(cfg.model).cuda()
opt = model.configure_optimizers()
opt = opt["optimizer"] if isinstance(opt, dict) else opt
x, y = torch.rand(64, 3, 32, 32, device="cuda"), torch.zeros(64, dtype=torch.long, device="cuda")
def step():
    loss = model.step((x, y), "train")["loss"]
    opt.zero_grad(); loss.backward(); opt.step(); model.ema.update(model.net)
step()  # first batch: the one-off latent-scale check
torch.cuda.synchronize()
torch.cuda.set_sync_debug_mode("error")
for _ in range(5):
    step()
torch.cuda.set_sync_debug_mode(0)
print("fused AdamW:", opt.defaults.get("fused"))
print("no host synchronisation in 5 latent_fm steps")
"""


def items(tag: str) -> dict[str, tuple[list[str], int, Path | None]]:
    """name -> (command, time limit in s, JSON it writes)."""
    out = {
        name: RESULTS / f"{name}_{tag}.json"
        for name in (
            "vae_eager",
            "vae_compile",
            "vae_cudagraphs",
            "dit_eager",
            "dit_compile",
            "train_overhead_gpu",
        )
    }
    return {
        "host_syncs": ([PY, "-c", HOST_SYNC_CHECK], 60, None),
        "gpu_correctness": (
            [
                PY,
                "-m",
                "pytest",
                "-q",
                "-p",
                "no:cacheprovider",
                "tests/data/test_render_on_device.py",
                "tests/models/test_compile_option.py",
                "-k",
                "cuda or fused or compiled_step_equals",
            ],
            150,
            None,
        ),
        "vae_eager": ([*VAE, *VAE_STEPS, "--out", str(out["vae_eager"])], 90, out["vae_eager"]),
        "vae_compile": (
            [*VAE, *VAE_STEPS, "--compile", "default", "--out", str(out["vae_compile"])],
            150,
            out["vae_compile"],
        ),
        "vae_cudagraphs": (
            [*VAE, *VAE_STEPS, "--compile", "reduce-overhead", "--out", str(out["vae_cudagraphs"])],
            150,
            out["vae_cudagraphs"],
        ),
        "train_overhead_gpu": (
            [
                PY,
                "benchmarks/bench_train_overhead_cpu.py",
                "--trainer",
                "gpu",
                "--cases",
                "beta_vae:proc_dsprites",
                "factor_vae:proc_dsprites",
                "--steps",
                "150",
                "--warmup",
                "30",
                "--repeats",
                "2",
                "--variants",
                "bare",
                "train",
                "--out",
                str(out["train_overhead_gpu"]),
            ],
            120,
            out["train_overhead_gpu"],
        ),
        "dit_eager": (
            [*DIT, *DIT_MODELS, "--steps", "15", "--warmup", "5", "--out", str(out["dit_eager"])],
            120,
            out["dit_eager"],
        ),
        "dit_compile": (
            [
                *DIT,
                *DIT_MODELS,
                "--steps",
                "15",
                "--warmup",
                "8",
                "--compile",
                "default",
                "--out",
                str(out["dit_compile"]),
            ],
            240,
            out["dit_compile"],
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", default=None)
    parser.add_argument("--list", action="store_true")
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available() and not args.list:
        raise SystemExit("error: no CUDA device; this suite measures the GPU paths of issue 19")
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    tag = gpu.split()[-1].lower().replace("-", "_") if gpu != "none" else "none"
    plan = items(tag)
    if args.list:
        print("\n".join(f"{n}: {' '.join(c[1:])}" for n, (c, _, _) in plan.items()))
        return
    # by priority: if the lease runs out, the later items are the ones to rerun
    order = [
        "host_syncs",
        "gpu_correctness",
        "dit_eager",
        "dit_compile",
        "vae_eager",
        "vae_compile",
        "train_overhead_gpu",
        "vae_cudagraphs",
    ]
    chosen = args.only or order
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}:{ROOT}"}
    summary_path = RESULTS / f"gpu_speed_suite_{tag}.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    summary.update({"device": gpu, "torch": torch.__version__})
    summary.setdefault("items", {})
    for name in chosen:
        command, limit, out = plan[name]
        print(f"== {name} (limit {limit} s)", flush=True)
        start = time.perf_counter()
        try:
            proc = subprocess.run(
                command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=limit
            )
            rc, tail = proc.returncode, (proc.stdout + proc.stderr)[-3000:]
        except subprocess.TimeoutExpired as error:
            rc, tail = 124, str(error.stdout or "")[-3000:]
        entry = {
            "command": " ".join(command if name != "host_syncs" else command[:2]),
            "rc": rc,
            "seconds": round(time.perf_counter() - start, 1),
        }
        if rc == 0 and out is not None and out.exists():
            entry["result"] = json.loads(out.read_text())
        else:
            entry["output_tail"] = tail
        summary["items"][name] = entry
        print(f"   rc={rc} in {entry['seconds']} s", flush=True)
        summary_path.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {summary_path}")


if __name__ == "__main__":
    main()
