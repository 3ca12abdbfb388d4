"""Latent flow matching throughput: training step (Lightning vs a bare PyTorch loop) and sampling.

Train: DiT-S/2 and DiT-B/2 on random 4x32x32 latents (the SD-VAE latents of 256-px images, fed as
``{"latent", "label"}`` batches as from the latent cache), AdamW + EMA update per step in both
loops, same DataLoader. Reports samples/s and the Lightning overhead
``(t_lightning − t_bare) / t_bare`` per step. Sample: images/s and NFE of euler (50 steps),
heun (25 steps, 50 NFE) and dopri5 (rtol = atol = 1e-5) with EMA weights (no VAE decode).
On GPU, MFU = (training FLOPs per sample, counted by ``torch.utils.flop_counter`` over one
forward + backward) x samples/s / ``--peak-tflops`` (default: 989 TFLOP/s, H100/H200 dense bf16).

Usage::

    python benchmarks/bench_latent_fm.py                       # full size (GPU), both models
    python benchmarks/bench_latent_fm.py --tiny                # CPU smoke: tiny DiT, 8x8 latents
    python benchmarks/bench_latent_fm.py --precision bf16-mixed --batch 64 --steps 50
    python benchmarks/bench_latent_fm.py --compile default --no-sampling   # model.compile
Writes benchmarks/results/latent_fm[_tiny].json.
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import sys
import time
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from latentzoo.models import LatentFlowMatching
from latentzoo.models.autoencoders import IdentityFirstStage
from latentzoo.models.ema import EMA
from latentzoo.models.nets.dit import DiT
from latentzoo.models.samplers import StraightPath

OUT_DIR = Path(__file__).resolve().parent / "results"
MODELS = {
    "dit_s2": functools.partial(DiT, size="S", patch_size=2),
    "dit_b2": functools.partial(DiT, size="B", patch_size=2),
    "dit_l2": functools.partial(DiT, size="L", patch_size=2),
    "dit_xl2": functools.partial(DiT, size="XL", patch_size=2),
    "dit_tiny": functools.partial(DiT, size=None, depth=2, hidden_size=64, num_heads=4),
}


class RandomLatents(Dataset):
    def __init__(self, n: int, shape: list[int], classes: int) -> None:
        gen = torch.Generator().manual_seed(0)
        self.z = torch.randn(n, *shape, generator=gen)
        self.y = torch.randint(0, classes, (n,), generator=gen)

    def __len__(self) -> int:
        return len(self.z)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"latent": self.z[i], "label": self.y[i]}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def build(name: str, shape: list[int], classes: int) -> LatentFlowMatching:
    return LatentFlowMatching(
        MODELS[name],
        IdentityFirstStage(shape[0]),
        [shape[0], shape[1], shape[2]],
        num_classes=classes,
        label_dropout=0.1,
        ema_decay=0.9999,
        optimizer=functools.partial(torch.optim.AdamW, lr=1e-4, weight_decay=0.0),
    )


def train_flops_per_sample(model: LatentFlowMatching, shape: list[int], batch: int) -> float:
    """FLOPs of one forward + backward of the backbone, per sample (dtype does not change it)."""
    from torch.utils.flop_counter import FlopCounterMode

    net = model.net
    device = next(net.parameters()).device
    z = torch.randn(batch, *shape, device=device)
    t = torch.rand(batch, device=device)
    y = torch.zeros(batch, dtype=torch.long, device=device)
    with FlopCounterMode(display=False) as counter:
        net(z, t, y).pow(2).mean().backward()
    net.zero_grad(set_to_none=True)
    return counter.get_total_flops() / batch


def bare_loop(
    model, loader, device, precision: str, warmup: int, steps: int, compile_mode: str | None
) -> float:
    """Seconds per step of a plain PyTorch loop doing what LatentFlowMatching.step does (with
    the same compile mode and, on CUDA, the fused AdamW latentzoo builds there)."""
    net = model.net.to(device).train()
    ema = EMA(net, 0.9999).to(device)
    if compile_mode:
        net.compile(mode=compile_mode)
    opt = torch.optim.AdamW(
        net.parameters(), lr=1e-4, weight_decay=0.0, fused=device.type == "cuda"
    )
    path, null = StraightPath(1e-5), model.null_label
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16-mixed")
    it, start = iter(loader), None
    for i in range(warmup + steps):
        if i == warmup:
            _sync(device)
            start = time.perf_counter()
        batch = next(it)
        z, y = batch["latent"].to(device), batch["label"].to(device)
        y = torch.where(torch.rand(len(y), device=device) < 0.1, torch.full_like(y, null), y)
        t = torch.rand(len(z), device=device)
        xt, ut = path.sample(z, torch.randn_like(z), t)
        with autocast:
            loss = (net(xt, t, y).float() - ut).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema.update(net)
    _sync(device)
    return (time.perf_counter() - start) / steps


class _Timer(L.Callback):
    def __init__(self, warmup: int) -> None:
        self.warmup, self.start, self.end, self.device = warmup, None, None, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.warmup and self.start is None:
            _sync(pl_module.device)
            self.start = time.perf_counter()

    def on_train_end(self, trainer, pl_module) -> None:
        _sync(pl_module.device)
        self.end = time.perf_counter()


def lightning_loop(model, loader, device, precision: str, warmup: int, steps: int) -> float:
    timer = _Timer(warmup)
    trainer = L.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=1,
        precision=precision,
        max_steps=warmup + steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        limit_val_batches=0,
        callbacks=[timer],
        num_sanity_val_steps=0,
    )
    trainer.fit(model, train_dataloaders=loader)
    return (timer.end - timer.start) / steps


@torch.no_grad()
def sampling(model, device, batch: int, shape) -> dict[str, dict[str, float]]:
    model = model.to(device).eval()
    results = {}
    for name, steps in [("euler", 50), ("heun", 25), ("dopri5", None)]:
        model.sample(batch, sampler=name, steps=steps, return_latents=True)  # warm-up
        _sync(device)
        start = time.perf_counter()
        model.sample(batch, sampler=name, steps=steps, return_latents=True)
        _sync(device)
        seconds = time.perf_counter() - start
        results[name] = {
            "steps": steps,
            "nfe": model.last_nfe,
            "seconds": seconds,
            "samples_per_s": batch / seconds,
        }
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["dit_s2", "dit_b2"])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--latent", type=int, nargs=3, default=[4, 32, 32])
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--precision", default=None, help="default: bf16-mixed on GPU, 32 on CPU")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke: tiny DiT, 4x8x8, 3 steps")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="for MFU (GPU only)")
    parser.add_argument("--compile", default="false", help="model.compile for both loops")
    parser.add_argument("--no-sampling", action="store_true", help="time training only")
    args = parser.parse_args()
    from latentzoo.models.base import compile_mode

    mode = compile_mode(args.compile)
    if args.tiny:
        args.models, args.latent, args.batch, args.steps, args.warmup = (
            ["dit_tiny"],
            [4, 8, 8],
            8,
            3,
            1,
        )
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = args.precision or ("bf16-mixed" if device.type == "cuda" else "32-true")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    n = args.batch * (args.warmup + args.steps + 2)
    report = {
        "device": torch.cuda.get_device_name()
        if device.type == "cuda"
        else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "precision": precision,
        "batch": args.batch,
        "latent_shape": args.latent,
        "num_classes": args.classes,
        "steps": args.steps,
        "compile": mode or False,
        "command": " ".join(["python", *sys.argv]),
        "models": {},
    }
    for name in args.models:
        loader = DataLoader(
            RandomLatents(n, args.latent, args.classes),
            batch_size=args.batch,
            shuffle=True,
            drop_last=True,
        )
        torch.manual_seed(0)
        bare = bare_loop(
            build(name, args.latent, args.classes),
            loader,
            device,
            precision,
            args.warmup,
            args.steps,
            mode,
        )
        torch.manual_seed(0)
        model = build(name, args.latent, args.classes)
        model.compile_mode = mode  # what model.compile=<mode> sets
        light = lightning_loop(model, loader, device, precision, args.warmup, args.steps)
        entry = {
            "params_M": sum(p.numel() for p in model.net.parameters()) / 1e6,
            "bare_s_per_step": bare,
            "lightning_s_per_step": light,
            "bare_samples_per_s": args.batch / bare,
            "lightning_samples_per_s": args.batch / light,
            "lightning_overhead_pct": 100 * (light - bare) / bare,
        }
        if not args.no_sampling:
            entry["sampling"] = sampling(model, device, args.batch, args.latent)
        flops = train_flops_per_sample(build(name, args.latent, args.classes), args.latent, 2)
        entry["train_gflops_per_sample"] = flops / 1e9
        if device.type == "cuda":
            entry["mfu_pct"] = (
                100 * flops * entry["lightning_samples_per_s"] / (args.peak_tflops * 1e12)
            )
        report["models"][name] = entry
        print(name, json.dumps(entry, indent=1))
    out = args.out or OUT_DIR / ("latent_fm_tiny.json" if args.tiny else "latent_fm.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
