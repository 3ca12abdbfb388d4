"""Lightning overhead of a VAE-family training step against a bare PyTorch loop.

For each model (beta_vae, beta_tcvae, factor_vae, lie_vae, built from ``configs/model/<name>.yaml``
on 64x64 proc_dsprites-shaped images) the same fixed in-memory batch is trained on

- ``bare``: a hand-written loop over the same model's loss (``step`` / FactorVAE's two updates)
  and the same optimizers (from ``configure_optimizers``); nothing else;
- ``lightning``: ``Trainer.fit`` on a DataLoader that yields that batch, with the model as
  shipped (per-step logging of every loss term, the non-finite-loss guard), no checkpointing, no
  progress bar, a CSV logger writing every ``--log-every`` steps;
- ``lightning_quiet`` (``--variants``): the same with the model's per-step ``self.log`` calls
  and the non-finite guard removed, to attribute the overhead to the base class or to Lightning.

Steady-state time per step is measured between two steps after ``--warmup`` steps (device
synchronised at both ends); each variant runs ``--repeats`` times alternately and the median is
reported. Overhead % = (lightning − bare) / bare, on wall time and on this process's CPU time
(the latter is steadier on a shared CPU; on a GPU the wall time is what counts, and it also
shows per-step host-device syncs). Target: ≤ 3 %, measured here and never asserted in tests.

Usage::

    python benchmarks/bench_vae_train_step.py [--models beta_vae lie_vae] [--batch-size 64]
        [--steps 200] [--warmup 20] [--repeats 3] [--device auto|cpu|cuda]
        [--compile false|default|reduce-overhead]
        [--out benchmarks/results/vae_train_step.json]

``--compile``: ``model.compile`` for both loops (the bare loop compiles the same networks with
``nn.Module.compile``), so the ratio stays like for like.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import tempfile
import time
import types
from pathlib import Path

import lightning as L
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from torch.utils.data import DataLoader, Dataset

from latentzoo.models import FactorVAE
from latentzoo.paths import config_dir

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "vae_train_step.json"
MODELS = ("beta_vae", "beta_tcvae", "factor_vae", "lie_vae")


def build_model(name: str, dataset_size: int) -> L.LightningModule:
    """``configs/model/<name>.yaml`` on proc_dsprites' image shape (1, 64, 64)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("train", overrides=[f"model={name}", "data=proc_dsprites"])
    model = instantiate(cfg.model)
    if hasattr(model, "dataset_size"):
        model.dataset_size = dataset_size
    return model


class RepeatBatch(Dataset):
    """The same (already batched, already on-device) tensor ``length`` times."""

    def __init__(self, batch: torch.Tensor, length: int) -> None:
        self.batch, self.length = batch, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> tuple[torch.Tensor]:
        return (self.batch,)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare_seconds_per_step(
    model: L.LightningModule, x: torch.Tensor, warmup: int, steps: int
) -> tuple[float, float]:
    """The same loss and optimizers in a plain loop."""
    device = x.device
    model = model.to(device).train()
    model.configure_model()  # model.compile: the same networks compiled as under Lightning
    optimizers = model.configure_optimizers()
    optimizers = optimizers if isinstance(optimizers, list) else [optimizers]

    if isinstance(model, FactorVAE):
        vae_opt, disc_opt = optimizers

        def one_step() -> None:
            terms, z = model.vae_terms(x)
            vae_opt.zero_grad()
            terms["loss"].backward()
            vae_opt.step()
            d_terms = model.discriminator_terms(z.detach(), z.detach())
            disc_opt.zero_grad()
            d_terms["d_loss"].backward()
            disc_opt.step()
    else:
        (optimizer,) = optimizers

        def one_step() -> None:
            loss = model.step((x,), "train")["loss"]
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

    if model.compile_mode == "reduce-overhead" and device.type == "cuda":
        eager_step = one_step

        def one_step() -> None:  # a new CUDA-graph generation per step, as LatentModel does
            torch.compiler.cudagraph_mark_step_begin()
            eager_step()

    for _ in range(warmup):
        one_step()
    sync(device)
    start, start_cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        one_step()
    sync(device)
    return (time.perf_counter() - start) / steps, (time.process_time() - start_cpu) / steps


class StepTimer(L.Callback):
    """Wall time between the end of step ``warmup`` and the end of step ``warmup + steps``."""

    def __init__(self, warmup: int, steps: int) -> None:
        self.warmup, self.steps = warmup, steps
        self.start = self.end = self.start_cpu = self.end_cpu = 0.0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step in (self.warmup, self.warmup + self.steps):
            sync(pl_module.device)
            now, now_cpu = time.perf_counter(), time.process_time()
            if trainer.global_step == self.warmup:
                self.start, self.start_cpu = now, now_cpu
            else:
                self.end, self.end_cpu = now, now_cpu

    @property
    def seconds_per_step(self) -> tuple[float, float]:
        """(wall, process CPU) seconds per step."""
        return (self.end - self.start) / self.steps, (self.end_cpu - self.start_cpu) / self.steps


def quiet(model: L.LightningModule) -> L.LightningModule:
    """The model without per-step logging and without the non-finite-loss guard."""
    if isinstance(model, FactorVAE):

        def training_step(self, batch, batch_idx):
            vae_opt, disc_opt = self.optimizers()
            terms, z = self.vae_terms(batch[0])
            vae_opt.zero_grad()
            self.manual_backward(terms["loss"])
            vae_opt.step()
            d_terms = self.discriminator_terms(z.detach(), z.detach())
            disc_opt.zero_grad()
            self.manual_backward(d_terms["d_loss"])
            self.trainer.strategy.optimizer_step(disc_opt.optimizer, closure=lambda: None)
    else:

        def training_step(self, batch, batch_idx):
            return self.step(batch, "train")["loss"]

    model.training_step = types.MethodType(training_step, model)
    return model


def lightning_seconds_per_step(
    model: L.LightningModule, x: torch.Tensor, warmup: int, steps: int, log_every: int
) -> tuple[float, float]:
    timer = StepTimer(warmup, steps)
    with tempfile.TemporaryDirectory() as root:
        trainer = L.Trainer(
            accelerator="gpu" if x.device.type == "cuda" else "cpu",
            devices=1,
            max_steps=warmup + steps,
            logger=L.pytorch.loggers.CSVLogger(root),
            log_every_n_steps=log_every,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_val_batches=0,
            num_sanity_val_steps=0,
            callbacks=[timer],
            default_root_dir=root,
        )
        loader = DataLoader(RepeatBatch(x, warmup + steps), batch_size=None, shuffle=False)
        trainer.fit(model, train_dataloaders=loader)
    return timer.seconds_per_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--log-every", type=int, default=25, help="trainer.log_every_n_steps")
    parser.add_argument("--variants", action="store_true", help="also time lightning_quiet")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--compile", default="false", help="model.compile for both loops")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    from latentzoo.models.base import compile_mode

    mode = compile_mode(args.compile)

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    L.seed_everything(0, verbose=False)
    x = (torch.rand(args.batch_size, 1, 64, 64, device=device) > 0.5).float()
    load_before = os.getloadavg()
    variants = ["bare", "lightning", *(["lightning_quiet"] if args.variants else [])]

    results = []
    for name in args.models:
        initial = build_model(name, dataset_size=737_280)
        times: dict[str, list[float]] = {v: [] for v in variants}
        cpu_times: dict[str, list[float]] = {v: [] for v in variants}
        for repeat in range(args.repeats):
            for variant in variants:
                model = copy.deepcopy(initial)
                model.compile_mode = mode
                if variant == "bare":
                    seconds, cpu = bare_seconds_per_step(model, x, args.warmup, args.steps)
                else:
                    model = quiet(model) if variant == "lightning_quiet" else model
                    seconds, cpu = lightning_seconds_per_step(
                        model, x, args.warmup, args.steps, args.log_every
                    )
                times[variant].append(seconds)
                cpu_times[variant].append(cpu)
                print(
                    f"{name:12s} {variant:16s} repeat {repeat}: {1e3 * seconds:8.3f} ms/step "
                    f"(process CPU {1e3 * cpu:8.3f} ms/step)"
                )
        median = {v: statistics.median(t) for v, t in times.items()}
        median_cpu = {v: statistics.median(t) for v, t in cpu_times.items()}
        entry = {
            "model": name,
            "ms_per_step": {v: round(1e3 * s, 4) for v, s in median.items()},
            "ms_per_step_all": {v: [round(1e3 * s, 4) for s in t] for v, t in times.items()},
            "overhead_pct": {
                v: round(100 * (median[v] - median["bare"]) / median["bare"], 2)
                for v in variants
                if v != "bare"
            },
            # host CPU time: robust to other processes on a shared CPU (not to GPU waits)
            "process_cpu_ms_per_step": {v: round(1e3 * s, 4) for v, s in median_cpu.items()},
            "process_cpu_overhead_pct": {
                v: round(100 * (median_cpu[v] - median_cpu["bare"]) / median_cpu["bare"], 2)
                for v in variants
                if v != "bare"
            },
        }
        print(
            f"{name:12s} overhead %: wall {entry['overhead_pct']}, "
            f"process CPU {entry['process_cpu_overhead_pct']}"
        )
        results.append(entry)

    report = {
        "benchmark": "vae_train_step",
        "target_overhead_pct": 3.0,
        "config": {
            "batch_size": args.batch_size,
            "image_shape": [1, 64, 64],
            "steps": args.steps,
            "warmup": args.warmup,
            "repeats": args.repeats,
            "log_every_n_steps": args.log_every,
            "device": str(device),
            "compile": mode or False,
        },
        "machine": {
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "load_avg_before": list(load_before),
            "load_avg_after": list(os.getloadavg()),
            "torch": torch.__version__,
            "lightning": L.__version__,
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
