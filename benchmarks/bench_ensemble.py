"""Vectorised seed ensembles: K β-VAE members in one step vs K single-model steps one after another.

The model is the dSprites β-VAE of ``configs/model/beta_vae.yaml`` (64x64x1, conv encoder and
decoder, 0.9 M parameters), Adam, batch ``--batch`` per member. For each K:

- ``ensemble`` (per ``--modes``): :class:`latentzoo.ensemble.engine.StackedEnsemble` steps, all K
  members in one vmapped forward/backward (``vmap``) or member by member on the stacked weights
  (``loop``), then one Adam step on [K, ...] weights;
- ``sequential``: K separate models each doing its own step on the same batches (what K single
  runs do, minus Lightning and data loading, which are the same per member for both).

Reported per K and mode: seconds per step, images/s, the per-member time ratio
``ensemble step / (K single steps)`` (< 1: the ensemble is faster per member), and memory per
member: the training state (weights + gradients + Adam moments, exact) and, on CUDA, the peak
allocated memory of the ensemble step divided by K. Timings are medians over ``--steps`` steps
after ``--warmup`` steps, the two taking turns step by step (a shared
machine's load then weighs on both alike).

Usage::

    python benchmarks/bench_ensemble.py [--ks 1 4 8] [--batch 64] [--steps 5] [--device cpu]
        [--out benchmarks/results/ensemble_cpu.json]
    python benchmarks/bench_ensemble.py --device cuda --ks 1 4 16 64 \
        --out benchmarks/results/ensemble_h100.json        # GPU mode (not run in this session)
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from latentzoo.ensemble.engine import StackedEnsemble
from latentzoo.models import BetaVAE
from latentzoo.models.nets import ConvDecoder, ConvEncoder

ROOT = Path(__file__).resolve().parents[1]
SHAPE = (1, 64, 64)


def beta_vae(seed: int) -> BetaVAE:
    torch.manual_seed(seed)
    model = BetaVAE(
        encoder=ConvEncoder(SHAPE, 20, channels=(32, 32, 64, 64), hidden=256),
        decoder=ConvDecoder(SHAPE, 10, channels=(32, 32, 64, 64), hidden=256),
        latent_dim=10,
        beta=4.0,
    )
    model.optimizer_factory = lambda params: torch.optim.Adam(params, lr=1e-3)
    return model


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(fns: dict, steps: int, warmup: int, device: torch.device) -> dict[str, float]:
    """Median seconds per call of each function, the functions taking turns step by step, so
    that the load of a shared machine weighs on all of them alike."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(warmup + steps):
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            fn(i)
            sync(device)
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def bench_k(
    k: int, batch: int, steps: int, warmup: int, device: torch.device, modes: list[str]
) -> dict:
    torch.manual_seed(1234)
    data = (torch.rand(warmup + steps, k, batch, *SHAPE) > 0.5).float().to(device)

    singles = [beta_vae(s).to(device) for s in range(k)]
    optimizers = [torch.optim.Adam(m.parameters(), lr=1e-3) for m in singles]

    def sequential(i: int) -> None:
        for j, (model, opt) in enumerate(zip(singles, optimizers, strict=True)):
            loss = model.step(data[i, j], "train")["loss"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    engines = {
        mode: StackedEnsemble(
            [beta_vae(s) for s in range(k)], list(range(k)), device, vectorize=mode
        )
        for mode in modes
    }
    steppers = {mode: (lambda i, e=e: e.training_step(data[i], i)) for mode, e in engines.items()}
    medians = interleaved({"sequential": sequential, **steppers}, steps, warmup, device)
    t_seq = medians["sequential"]
    engine = engines[modes[0]]
    params = sum(t[0].numel() for t in engine.params.values())
    out = {
        "K": k,
        "sequential_step_s": round(t_seq, 5),
        "sequential_images_per_s": round(k * batch / t_seq, 1),
    }
    for mode in modes:
        t_ens = medians[mode]
        out[mode] = {
            "ensemble_step_s": round(t_ens, 5),
            "ensemble_images_per_s": round(k * batch / t_ens, 1),
            "per_member_time_ratio": round(t_ens / t_seq, 3),
            "speedup": round(t_seq / t_ens, 3),
        }
    out["params_per_member"] = params
    out["state_bytes_per_member"] = params * 4 * 4  # weights, gradients, Adam's two moments
    if device.type == "cuda":  # one ensemble step alone (weights, Adam state, the batches)
        del singles, optimizers, sequential, steppers
        engines = {modes[0]: engine}
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        engine.training_step(data[0], 0)
        sync(device)
        out["resident_bytes_per_member_incl_batches"] = int(base / k)
        out["peak_allocated_bytes_per_member"] = int(torch.cuda.max_memory_allocated(device) / k)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--modes", nargs="+", default=["vmap", "loop"], choices=["vmap", "loop"])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "ensemble_cpu.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = []
    for k in args.ks:
        row = bench_k(k, args.batch, args.steps, args.warmup, device, args.modes)
        print(json.dumps(row), flush=True)
        rows.append(row)
    result = {
        "benchmark": "bench_ensemble",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "cpu": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "batch_per_member": args.batch,
        "steps_timed": args.steps,
        "model": "beta_vae dSprites conv (configs/model/beta_vae.yaml), Adam",
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
