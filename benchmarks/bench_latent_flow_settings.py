"""LatentFlow settings compared on the CPU: loss-term magnitudes at initialisation and, after a
fixed short training budget, the loss terms and the equivariance error E_k.

Two comparisons (``--compare``), each on ``experiment=latent_flow_proc_digits`` (offline
MNIST stand-in, S = 3, debug sizes: latent 16, conv width 16):

- ``time_scale``: ``model.potential.time_scale`` 1000 (the former default: the time embedding
  saw 1000·τ) against S (the default now: the embedding sees the frame index) and 1. With
  τ = t/S, u_LZ = S·u_ORIG is a reparameterisation of the model, not of the loss: ∂_τ u grows
  with the scale, and the PDE term with its square. The magnitudes at initialisation are also
  measured at MNIST size (latent 324, the per-resolution conv trunk, S = 8).
- ``faithful``: the [ORIGINAL] switches of ``experiment=latent_flow_faithful`` (read from its
  ``model:`` section) against the latentzoo defaults.

Training: the same ``--train-batches`` rendered batches (16 sequences each, cycled) for every
setting, in a plain PyTorch loop over ``model.step`` (Lightning adds nothing to these numbers),
``--steps`` optimizer steps per run and seed. E_k:
summed L1 over pixels and steps, mean over ``--eval-per-k`` validation sequences per k,
z_0 = μ(x_0) for every setting (so that sampling noise does not enter the comparison).

Usage::

    python benchmarks/bench_latent_flow_settings.py --compare time_scale
        [--steps 400] [--seeds 0 1 2] [--out benchmarks/results/latent_flow_time_scale_cpu.json]
    python benchmarks/bench_latent_flow_settings.py --compare faithful
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from omegaconf import OmegaConf
from tqdm import tqdm

from latentzoo.paths import config_dir
from latentzoo.utils.distributed import instantiate_datamodule

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
TERMS = ("loss", "recon", "kl0", "seq_rec", "kl_flow", "pde", "ic")
BASE = ["experiment=latent_flow_proc_digits", "data.batch_size=16", "data.val_per_k=64"]
MNIST_SIZE = ["model.latent_dim=324", "model.encoder.channels=null", "model.encoder.hidden=null"]


def faithful_overrides() -> list[str]:
    """The ``model:`` switches of experiment=latent_flow_faithful, as overrides (latent size and
    data excepted: they stay at the proc_digits debug sizes)."""
    cfg = OmegaConf.load(Path(config_dir()) / "experiment" / "latent_flow_faithful.yaml")
    flat = OmegaConf.to_container(cfg.model)
    out = []
    for key, value in flat.items():
        if key == "latent_dim":
            continue
        if isinstance(value, dict):
            out += [f"model.{key}.{sub}={v}" for sub, v in value.items()]
        else:
            out.append(f"model.{key}={value}")
    return out


def settings(compare: str) -> dict[str, list[str]]:
    if compare == "time_scale":
        return {
            "time_scale=1000": ["model.potential.time_scale=1000"],
            "time_scale=S": ["model.potential.time_scale=${data.seq_len}"],
            "time_scale=1": ["model.potential.time_scale=1"],
        }
    if compare == "faithful":
        return {"latentzoo_defaults": [], "faithful_switches": faithful_overrides()}
    raise SystemExit(f"--compare must be time_scale or faithful, got {compare}")


def compose_cfg(overrides: list[str]):
    os.environ.setdefault("PROJECT_ROOT", str(ROOT))
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose("train", overrides=[*BASE, *overrides])


def mean_terms(rows: list[dict[str, float]]) -> dict[str, float]:
    return {name: statistics.fmean(r[name] for r in rows) for name in rows[0]}


def terms_of(out: dict[str, torch.Tensor]) -> dict[str, float]:
    return {name: float(out[name].detach()) for name in TERMS if name in out}


def init_magnitudes(overrides: list[str], seeds: list[int], batch: int) -> dict[str, float]:
    """Loss terms of a freshly initialised MNIST-size model on one training batch per seed."""
    cfg = compose_cfg([*overrides, *MNIST_SIZE, "data.seq_len=8", f"data.batch_size={batch}"])
    rows = []
    for seed in seeds:
        L.seed_everything(seed, verbose=False)
        model, dm = instantiate(cfg.model), instantiate_datamodule(cfg.data)
        dm.setup("fit")
        frames = next(iter(dm.train_dataloader()))
        rows.append(terms_of(model.step(frames, "train")))
    return mean_terms(rows)


class Batches:
    """The same rendered batches for every setting: ``train`` (cycled) and ``val``."""

    def __init__(self, seed: int, num_train: int) -> None:
        cfg = compose_cfg([f"seed={seed}"])
        L.seed_everything(seed, verbose=False)
        self.dm = instantiate_datamodule(cfg.data)
        self.dm.setup("fit")
        loader = iter(self.dm.train_dataloader())
        self.train = [next(loader) for _ in tqdm(range(num_train), desc="render", leave=False)]
        self.val = list(self.dm.val_dataloader())


@torch.no_grad()
def equivariance(model, data: Batches) -> dict[str, float]:
    """E_k (summed L1 over pixels and steps) per k and its mean, z_0 = μ, validation split."""
    model.eval()
    model.posterior_sample_eval = False
    sums: dict[int, list[float]] = {}
    for batch in data.val:
        frames, k = batch["frames"], batch["k"]
        decoded = model.transform(frames[:, 0], k, frames.shape[1] - 1)
        target = frames[:, 1:].transpose(0, 1)
        err = (decoded[1:] - target).abs().flatten(2).sum(2).sum(0)  # (B,)
        sums.setdefault(int(k[0]), []).extend(err.tolist())
    out = {f"E_k{k}": statistics.fmean(v) for k, v in sorted(sums.items())}
    out["E_mean"] = statistics.fmean(out.values())
    pixels = int(np.prod(data.dm.image_shape)) * data.dm.eval_seq_len
    out["E_mean/per_pixel"] = out["E_mean"] / pixels
    model.train()
    return out


def train_run(overrides: list[str], seed: int, steps: int, data: Batches) -> dict:
    cfg = compose_cfg([*overrides, f"seed={seed}"])
    L.seed_everything(seed, verbose=False)
    model = instantiate(cfg.model)
    optimizer = model.configure_optimizers()
    history: list[dict[str, float]] = []
    started = time.perf_counter()
    for step in tqdm(range(steps), desc=f"seed {seed}", leave=False):
        out = model.step(data.train[step % len(data.train)], "train")
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        history.append(terms_of(out))
    seconds = time.perf_counter() - started
    tail = max(1, steps // 10)
    return {
        "seed": seed,
        "train_seconds": round(seconds, 1),
        "first_step_terms": history[0],
        f"last_{tail}_steps_mean_terms": mean_terms(history[-tail:]),
        "equivariance_val": equivariance(model, data),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--compare", choices=["time_scale", "faithful"], default="time_scale")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--train-batches", type=int, default=40, help="rendered once, cycled")
    parser.add_argument("--init-batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="1: no spin-waits on a shared CPU")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out_path = args.out or RESULTS / f"latent_flow_{args.compare}_cpu.json"
    data = {seed: Batches(seed, args.train_batches) for seed in args.seeds}
    results = {}
    for name, overrides in settings(args.compare).items():
        print(f"== {name}: {' '.join(overrides) or '(defaults)'}", flush=True)
        entry: dict = {"overrides": overrides}
        if args.compare == "time_scale":
            entry["init_mnist_size_terms"] = init_magnitudes(overrides, args.seeds, args.init_batch)
            print("   init (MNIST size):", entry["init_mnist_size_terms"], flush=True)
        entry["runs"] = [train_run(overrides, seed, args.steps, data[seed]) for seed in args.seeds]
        for run in entry["runs"]:
            tail = next(v for k, v in run.items() if k.startswith("last_"))
            print(f"   seed {run['seed']}: {tail} {run['equivariance_val']}", flush=True)
        results[name] = entry
    report = {
        "benchmark": f"latent_flow_settings --compare {args.compare}",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "device": f"cpu ({platform.processor() or platform.machine()}), {args.threads} threads",
        "torch": torch.__version__,
        "base_overrides": BASE,
        "steps": args.steps,
        "train_batches": args.train_batches,
        "seeds": args.seeds,
        "results": results,
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
