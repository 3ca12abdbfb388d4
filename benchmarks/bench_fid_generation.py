"""FID generation throughput: images/s of ``model.sample`` through the FID sampling loop
(``latentzoo.metrics.generative.generate``: eval mode, per-batch seeds, uint8), including the
first-stage decode, for euler-50 and dopri5 (rtol = atol = 1e-5), fp32 vs bf16 autocast
(``metrics.fid.precision``).

Model: latent_fm with a DiT backbone (default DiT-S/8) on latentzoo's kl_f4 first stage (f4,
3 latent channels, as configs/model/autoencoder/kl_f4.yaml) for 64-px images (3x16x16 latents),
untrained: all weights get N(0, 0.02²) noise added so the velocity field is not the zero-init
DiT's ~0 (dopri5 would then stop after a few steps). Only speed, NFE and fp32-vs-bf16 image
agreement are meaningful here, not image quality. Also reports the decode time per image.

Usage::

    python benchmarks/bench_fid_generation.py                     # CPU, DiT-S/8, 32 images
    python benchmarks/bench_fid_generation.py --backbone dit_tiny --samples 16 --batch 8
Writes benchmarks/results/fid_generation_<device>.json.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from latentzoo.metrics.generative import generate
from latentzoo.models import LatentFlowMatching
from latentzoo.models.autoencoders import KLAutoencoderNet, KLFirstStage
from latentzoo.models.nets.dit import DiT

OUT_DIR = Path(__file__).resolve().parent / "results"
BACKBONES = {
    "dit_s8": functools.partial(DiT, size="S", patch_size=8),
    "dit_s4": functools.partial(DiT, size="S", patch_size=4),
    "dit_tiny": functools.partial(DiT, size=None, depth=2, hidden_size=64, num_heads=4),
}
SAMPLERS = {"euler-50": {"sampler": "euler", "steps": 50}, "dopri5": {"sampler": "dopri5"}}


def build(backbone: str, size: int, device: torch.device) -> LatentFlowMatching:
    torch.manual_seed(0)
    first_stage = KLFirstStage(
        net=KLAutoencoderNet(in_channels=3, z_channels=3, ch=32, ch_mult=[1, 2, 4]),
        name="kl_f4",
    )
    model = LatentFlowMatching(BACKBONES[backbone], first_stage, [3, size, size], ema_decay=None)
    with torch.no_grad():
        for p in model.net.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.to(device).eval()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run(
    model, samples: int, batch: int, options: dict, precision: str
) -> tuple[dict, torch.Tensor]:
    kept: list[torch.Tensor] = []
    sink = lambda images, chunk: kept.append(images.cpu())  # noqa: E731
    generate(model, lambda *_: None, batch, batch, sample_kwargs=options, precision=precision)
    values = generate(model, sink, samples, batch, sample_kwargs=options, precision=precision)
    return values, torch.cat(kept)


def decode_seconds_per_image(model, batch: int, device: torch.device, repeats: int = 3) -> float:
    z = torch.randn(batch, *model.latent_shape, device=device)
    model.decode_latents(z)
    _sync(device)
    began = time.perf_counter()
    for _ in range(repeats):
        model.decode_latents(z)
    _sync(device)
    return (time.perf_counter() - began) / (repeats * batch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="dit_s8", choices=sorted(BACKBONES))
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--out", default=None)
    parser.add_argument("--note", default="", help="stored in the JSON (e.g. the code state)")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build(args.backbone, args.image_size, device)
    results: dict = {}
    for name, options in SAMPLERS.items():
        images = {}
        for precision in ("fp32", "bf16"):
            values, images[precision] = run(model, args.samples, args.batch, options, precision)
            results[f"{name}/{precision}"] = values
            print(
                f"{name:9s} {precision}: {values['images_per_second']:.2f} images/s, "
                f"nfe {values.get('nfe', float('nan')):.1f}",
                flush=True,
            )
        diff = (images["fp32"].float() - images["bf16"].float()).abs()
        results[f"{name}/bf16_vs_fp32_uint8_abs_diff"] = {
            "mean": float(diff.mean()),
            "max": float(diff.max()),
        }
        results[f"{name}/bf16_speedup"] = (
            results[f"{name}/bf16"]["images_per_second"]
            / results[f"{name}/fp32"]["images_per_second"]
        )
    report = {
        "device": torch.cuda.get_device_name()
        if device.type == "cuda"
        else platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "load_average_1min": os.getloadavg()[0],  # other processes on a shared machine
        "torch": torch.__version__,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "backbone": args.backbone,
        "params_M": sum(p.numel() for p in model.net.parameters()) / 1e6,
        "image_shape": [3, args.image_size, args.image_size],
        "latent_shape": list(model.latent_shape),
        "samples": args.samples,
        "batch": args.batch,
        "decode_seconds_per_image_fp32": decode_seconds_per_image(model, args.batch, device),
        "note": args.note,
        "results": results,
    }
    out = Path(args.out) if args.out else OUT_DIR / f"fid_generation_{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
