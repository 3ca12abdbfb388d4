"""Framework tax of the default training path: the real ``train()`` against a bare PyTorch loop.

For each case (model, data config) the same initial weights and the same batches are trained
by

- ``train``: ``latentzoo.train.train(cfg)``, the real task with the default datamodule (its
  in-process renderer, prefetching ``data.prefetch`` batches ahead in a thread), the default
  callbacks (checkpointing, progress bar, image grids, ...), the CSV logger and the model as
  shipped;
- ``train_sync``: the same with ``data.prefetch=0`` (rendering on the critical path, as
  before the prefetching loaders);
- ``bare``: a plain loop over the same batches pre-rendered into memory (what a researcher
  with the data set in RAM would write): ``model.step`` / FactorVAE's two updates, the same
  optimizers, nothing else.

Steady-state time per step is taken between the end of step ``--warmup`` and step
``--warmup + --steps`` (no validation falls in between). Variants run interleaved,
``--repeats`` times; the JSON has every repeat, the median, the spread (min, max) and the
per-repeat ratio train / bare (paired: same repeat, adjacent in time). Target (issue 19): the
median ratio <= 1.03. Never asserted in tests.

Usage::

    PYTHONPATH=src python benchmarks/bench_train_overhead_cpu.py [--cases beta_vae:proc_dsprites]
        [--steps 60] [--warmup 10] [--repeats 3] [--out benchmarks/results/train_overhead_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.conftest.compose_config: the CLI's composition
from tests.conftest import compose_config  # noqa: E402

DEFAULT_OUT = ROOT / "benchmarks" / "results" / "train_overhead_cpu.json"
#: case name -> overrides (model, data and what keeps a step CPU-sized)
CASES: dict[str, list[str]] = {
    "beta_vae:proc_dsprites": ["model=beta_vae", "data=proc_dsprites"],
    "factor_vae:proc_dsprites": ["model=factor_vae", "data=proc_dsprites"],
    "beta_vae:proc_shapes3d": ["model=beta_vae", "data=proc_shapes3d"],
    "latent_flow:proc_dsprites_seq": [
        "experiment=latent_flow_proc_dsprites",
        "data.batch_size=16",
    ],
}


class StepTimer(L.Callback):
    """Wall and process-CPU time between the ends of steps ``warmup`` and ``warmup + steps``."""

    def __init__(self, warmup: int, steps: int) -> None:
        self.warmup, self.steps = warmup, steps
        self.marks: dict[int, tuple[float, float]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step in (self.warmup, self.warmup + self.steps):
            _sync()
            self.marks[trainer.global_step] = (time.perf_counter(), time.process_time())

    def per_step(self) -> tuple[float, float]:
        (w0, c0), (w1, c1) = self.marks[self.warmup], self.marks[self.warmup + self.steps]
        return (w1 - w0) / self.steps, (c1 - c0) / self.steps


TRAINER = "cpu"  # --trainer: cpu here; the GPU suite runs it with gpu


def _sync() -> None:
    if TRAINER == "gpu":
        torch.cuda.synchronize()


def _cfg(case: list[str], out: Path, total_steps: int, prefetch: int | None) -> Any:
    overrides = [
        *case,
        f"trainer={TRAINER}",
        f"trainer.max_steps={total_steps}",
        "trainer.val_check_interval=100000",  # validation only after the timed window
        "trainer.limit_val_batches=1",
        "test=false",
        "seed=0",
        "extras.print_config=false",
        *([f"data.prefetch={prefetch}"] if prefetch is not None else []),
    ]
    return compose_config("train", overrides, out)


def time_train(case: list[str], warmup: int, steps: int, prefetch: int | None) -> tuple:
    import latentzoo.train as train_task

    timer = StepTimer(warmup, steps)
    real = train_task.instantiate_callbacks

    def with_timer(cfg: Any) -> list:
        return [*real(cfg), timer]

    train_task.instantiate_callbacks = with_timer
    try:
        with tempfile.TemporaryDirectory(prefix="h19-bench-") as out:
            cfg = _cfg(case, Path(out), warmup + steps, prefetch)
            train_task.train(cfg)
    finally:
        train_task.instantiate_callbacks = real
    return timer.per_step()


def _batches(cfg: Any, n: int) -> list[Any]:
    """The first ``n`` training batches of the run (synchronous loader, run seed set)."""
    from hydra.utils import instantiate

    from latentzoo.utils.distributed import resolve_batch_size

    dm = instantiate(resolve_batch_size(cfg.data, 1))
    dm.setup("fit")
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(0)
    it = iter(loader)
    return [next(it) for _ in range(n)]


def time_bare(case: list[str], warmup: int, steps: int) -> tuple[float, float]:
    from hydra.utils import instantiate

    from latentzoo.models import FactorVAE

    with tempfile.TemporaryDirectory(prefix="h19-bench-") as out:
        cfg = _cfg(case, Path(out), warmup + steps, None)
    L.seed_everything(cfg.seed, verbose=False)
    device = torch.device("cuda" if TRAINER == "gpu" else "cpu")
    model = instantiate(cfg.model).train().to(device)
    batches = [
        [t.to(device) for t in b] if isinstance(b, list | tuple) else b
        for b in _batches(cfg, warmup + steps)
    ]
    if isinstance(batches[0], dict):
        batches = [{k: v.to(device) for k, v in b.items()} for b in batches]
    if hasattr(model, "dataset_size"):
        model.dataset_size = 737_280
    optimizers = model.configure_optimizers()
    if isinstance(optimizers, dict):
        optimizers = optimizers["optimizer"]
    optimizers = optimizers if isinstance(optimizers, list) else [optimizers]

    if isinstance(model, FactorVAE):
        vae_opt, disc_opt = optimizers

        def one_step(batch: Any) -> None:
            x_vae, x_other = model.split_batch(batch[0])
            terms, z = model.vae_terms(x_vae)
            vae_opt.zero_grad()
            terms["loss"].backward()
            vae_opt.step()
            d_terms = model.discriminator_terms(*model.discriminator_inputs(z, x_other))
            disc_opt.zero_grad()
            d_terms["d_loss"].backward()
            disc_opt.step()
    else:
        (optimizer,) = optimizers

        def one_step(batch: Any) -> None:
            loss = model.step(batch, "train")["loss"]
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

    for batch in batches[:warmup]:
        one_step(batch)
    _sync()
    start, start_cpu = time.perf_counter(), time.process_time()
    for batch in batches[warmup:]:
        one_step(batch)
    _sync()
    return (time.perf_counter() - start) / steps, (time.process_time() - start_cpu) / steps


def _summary(values: list[float]) -> dict[str, Any]:
    return {
        "median": round(1e3 * statistics.median(values), 3),
        "min": round(1e3 * min(values), 3),
        "max": round(1e3 * max(values), 3),
        "all": [round(1e3 * v, 3) for v in values],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--variants", nargs="+", default=["bare", "train", "train_sync"])
    parser.add_argument("--trainer", default="cpu", choices=["cpu", "gpu"])
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (1: the step on one core, rendering free to use another; "
        "on a shared CPU, OpenMP threads spinning for a descheduled peer inflate both loops)",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    global TRAINER
    TRAINER = args.trainer
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    load_before = os.getloadavg()

    results: list[dict[str, Any]] = []
    report = {
        "benchmark": "train_overhead_cpu",
        "target_ratio": 1.03,
        "command": " ".join(["python", *sys.argv]),
        "config": {
            "steps": args.steps,
            "warmup": args.warmup,
            "repeats": args.repeats,
            "threads": args.threads,
        },
        "results": results,
    }
    for name in args.cases:
        case = CASES[name]
        wall: dict[str, list[float]] = {v: [] for v in args.variants}
        cpu: dict[str, list[float]] = {v: [] for v in args.variants}
        for repeat in range(args.repeats):
            for variant in args.variants:
                if variant == "bare":
                    w, c = time_bare(case, args.warmup, args.steps)
                else:
                    prefetch = 0 if variant == "train_sync" else None
                    w, c = time_train(case, args.warmup, args.steps, prefetch)
                wall[variant].append(w)
                cpu[variant].append(c)
                print(
                    f"{name:30s} {variant:10s} repeat {repeat}: {1e3 * w:8.2f} ms/step "
                    f"(process CPU {1e3 * c:8.2f})",
                    flush=True,
                )
        ratios = {
            v: [round(a / b, 4) for a, b in zip(wall[v], wall["bare"], strict=True)]
            for v in args.variants
            if v != "bare" and "bare" in wall
        }
        entry = {
            "case": name,
            "overrides": case,
            "ms_per_step": {v: _summary(t) for v, t in wall.items()},
            "process_cpu_ms_per_step": {v: _summary(t) for v, t in cpu.items()},
            "ratio_to_bare_per_repeat": ratios,
            "ratio_to_bare_median": {v: statistics.median(r) for v, r in ratios.items()},
        }
        print(f"{name}: ratio to bare (median over repeats) {entry['ratio_to_bare_median']}")
        results.append(entry)
        _write(args.out, report, load_before)  # after each case: a cut-short run keeps its cases
    print(f"wrote {args.out}")


def _write(out: Path, report: dict[str, Any], load_before: tuple[float, ...]) -> None:
    report["machine"] = {
        "device": torch.cuda.get_device_name() if TRAINER == "gpu" else "cpu",
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_avg_before": list(load_before),
        "load_avg_after": list(os.getloadavg()),
        "torch": torch.__version__,
        "lightning": L.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
