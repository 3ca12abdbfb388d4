"""Deep Latent Particles throughput (dlp.md §8): images/s of a training step (forward + loss +
backward + Adam) and of the deterministic forward (``reconstruct``), for the masked model (CelebA
setting: K = 30, patch 8, 128 px) and the object model (CLEVRER setting: K = 10, patch 16,
128 px), both with ``rec_loss=mse`` (``--vgg`` adds the perceptual loss; needs the weights).
The JSON records the accelerator's real name (``torch.cuda.get_device_name``) and the command.

Usage::

    python benchmarks/bench_dlp.py [--image-size 128] [--batch-size 32] [--steps 20]
        [--warmup 3] [--device auto|cpu|cuda] [--out benchmarks/results/dlp.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

from latentzoo.models.dlp import DeepLatentParticles

SETTINGS = {
    "masked": dict(n_kp=30, n_kp_prior=50, patch_size=8, learned_feature_dim=10, anchor_s=0.125),
    "object": dict(
        n_kp=10,
        n_kp_prior=20,
        patch_size=16,
        learned_feature_dim=5,
        anchor_s=0.25,
        use_object_dec=True,
    ),
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench(name: str, args: argparse.Namespace, device: torch.device) -> dict:
    torch.manual_seed(0)
    size = args.image_size
    model = DeepLatentParticles(
        [3, size, size], rec_loss="vgg" if args.vgg else "mse", **SETTINGS[name]
    ).to(device)
    opt = torch.optim.Adam(model.optimizer_params(), lr=2e-4, eps=1e-4)
    x = torch.rand(args.batch_size, 3, size, size, device=device)
    result = {"params": sum(p.numel() for p in model.parameters())}
    for mode in ("train_step", "reconstruct"):
        model.train(mode == "train_step")
        for i in range(args.warmup + args.steps):
            if i == args.warmup:
                sync(device)
                start = time.perf_counter()
            if mode == "train_step":
                loss = model.step((x, None), "train")["loss"]
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            else:
                model.reconstruct(x)
        sync(device)
        seconds = (time.perf_counter() - start) / args.steps
        result[f"{mode}_images_per_s"] = args.batch_size / seconds
        print(f"{name:7s} {mode:12s} {args.batch_size / seconds:9.1f} images/s")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--vgg", action="store_true")
    parser.add_argument("--out", default="benchmarks/results/dlp.json")
    args = parser.parse_args()
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    )
    results = {name: bench(name, args, device) for name in SETTINGS}
    info = {
        **vars(args),  # first: its "device" (auto/cpu/cuda) is replaced by the real name below
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "torch": torch.__version__,
        "command": shlex.join([sys.executable, *sys.argv]),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"config": info, "results": results}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
