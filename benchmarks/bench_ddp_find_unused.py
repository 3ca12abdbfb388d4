"""Cost of DDP's unused-parameter search (``find_unused_parameters=True``) per training step.

Each model (built from its config as ``python train.py`` would) trains ``--steps`` steps on a
fixed in-memory batch per rank under Lightning DDP with 2 CPU processes (gloo, as
``trainer=ddp_sim``), once with plain ``ddp`` (when the model allows it) and once with
``ddp_find_unused_parameters_true``. Steady-state milliseconds per step are the median of
the step times after ``--warmup`` steps. Models that need the search (``ddp_find_unused_parameters``
is True: FactorVAE, Soft-IntroVAE, latent_flow, the DLP object model in warm-up) cannot run
plain ``ddp``; for them the table gives the step time with the search, and the β-VAE/Lie-VAE
rows show what the search itself costs on a model of that size.

    python benchmarks/bench_ddp_find_unused.py [--steps 60] [--warmup 10]
        [--out benchmarks/results/ddp_find_unused_cpu.json]

On a GPU add ``--accelerator gpu`` (nccl); never asserted in tests.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import hydra
import lightning as L
import torch
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from latentzoo.utils.distributed import instantiate_datamodule  # noqa: E402
from tests.conftest import compose_config  # noqa: E402

SMALL = ["data.dataset.size=small", "data.val_size=32", "data.test_size=32"]
MODELS = {
    "beta_vae": SMALL,
    "lie_vae": ["model=lie_vae", *SMALL],
    "factor_vae": ["model=factor_vae", *SMALL],
    "soft_intro_vae": ["experiment=soft_intro_vae_proc_cifar", "data.num_train=256"],
    "latent_flow": ["experiment=latent_flow_proc_dsprites"],
}


class StepTimer(L.Callback):
    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_batch_start(self, *args) -> None:
        self.start = time.perf_counter()

    def on_train_batch_end(self, *args) -> None:
        self.times.append(time.perf_counter() - self.start)


def run_one(model_name: str, strategy: str, args: argparse.Namespace) -> None:
    """Inside the DDP processes: time the steps, rank 0 prints one JSON line."""
    cfg = compose_config("train", [*MODELS[model_name], f"data.batch_size={args.batch_size}"])
    torch.manual_seed(0)
    datamodule = instantiate_datamodule(cfg.data)
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    model = hydra.utils.instantiate(cfg.model)
    timer = StepTimer()
    trainer = L.Trainer(
        accelerator=args.accelerator,
        devices=2,
        strategy=strategy,
        max_steps=args.steps,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
    )
    trainer.fit(model, train_dataloaders=DataLoader([batch] * args.steps, batch_size=None))
    if trainer.is_global_zero:
        steady = timer.times[args.warmup :]
        print("RESULT " + json.dumps({"ms_per_step": 1000 * statistics.median(steady)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/ddp_find_unused_cpu.json"))
    parser.add_argument("--_run", nargs=2, help=argparse.SUPPRESS)
    args, _ = parser.parse_known_args()  # DDP children get Hydra overrides appended
    if args._run:
        run_one(*args._run, args)
        return

    results = []
    for name in args.models:
        cfg = compose_config("train", MODELS[name])
        needs = bool(
            getattr(hydra.utils.get_class(cfg.model._target_), "ddp_find_unused_parameters", False)
        )
        row: dict = {"model": name, "needs_find_unused": needs}
        for strategy in (
            ["ddp_find_unused_parameters_true"]
            if needs
            else ["ddp", "ddp_find_unused_parameters_true"]
        ):
            argv = [sys.executable, __file__, *sys.argv[1:], "--_run", name, strategy]
            done = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT)
            line = next((ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if line is None:
                raise SystemExit(f"{name} / {strategy} failed:\n{done.stderr[-3000:]}")
            row[strategy] = json.loads(line[len("RESULT ") :])["ms_per_step"]
        if "ddp" in row:
            row["find_unused_overhead_pct"] = 100 * (
                row["ddp_find_unused_parameters_true"] / row["ddp"] - 1
            )
        print(row, flush=True)
        results.append(row)
    cpu = platform.processor() or platform.machine()
    out = {
        "benchmark": "bench_ddp_find_unused",
        "command": "python " + " ".join([os.path.relpath(__file__, ROOT), *sys.argv[1:]]),
        "device": f"2 DDP processes on {args.accelerator} ({cpu}, {os.cpu_count()} cores), "
        f"torch {torch.__version__}",
        "batch_size_per_rank": args.batch_size,
        "steps": args.steps,
        "warmup": args.warmup,
        "results": results,
    }
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
