"""Latent-cache throughput: images/s of ``cache_latents`` on proc_blobs 64 px.

For each first stage (``identity``: the pipeline alone, no network; ``kl_f4``: latentzoo's KL
autoencoder, random weights, same cost as trained ones) and precision (fp32; bf16 autocast), one
uncached pass encodes ``--images`` source images into a fresh folder, each with its horizontal
flip (2 encoder passes per image), writing float16 shards. Reported: source images/s of the whole
call (render + encode + write), and of the data pass alone (rendering and collating the images,
no encoder) for scale.

Usage::

    python benchmarks/bench_cache_latents.py [--images 512] [--batch 64] [--device cpu]
        [--threads N] [--out benchmarks/results/cache_latents_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset

from latentzoo.cache_latents import cache_latents
from latentzoo.data.images import ImageCollate, ProcBlobsDataModule
from latentzoo.models.autoencoders import IdentityFirstStage, KLAutoencoderNet, KLFirstStage

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "cache_latents_cpu.json"


def first_stage(name: str) -> torch.nn.Module:
    if name == "identity":
        return IdentityFirstStage(3)
    torch.manual_seed(0)  # configs/model/autoencoder/kl_f4.yaml's net
    return KLFirstStage(net=KLAutoencoderNet(3, 3, 32, [1, 2, 4], 1), scale_factor=1.0)


def data_pass(dataset, images: int, batch: int) -> float:
    """Seconds to render and collate ``images`` images (what the cache reads)."""
    start = time.perf_counter()
    loader = DataLoader(
        Subset(dataset, range(images)), batch_size=batch, collate_fn=ImageCollate(False)
    )
    for _ in loader:
        pass
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    dataset = ProcBlobsDataModule(image_size=64, num_train=args.images).reference_dataset("train")
    data_s = min(data_pass(dataset, args.images, args.batch) for _ in range(2))
    results = []
    folder = Path(tempfile.mkdtemp(prefix="bench_cache_"))
    try:
        for name in ("identity", "kl_f4"):
            for precision in ("fp32", "bf16"):
                stage = first_stage(name)
                cache_latents(  # warm-up (allocator, kernels)
                    dataset,
                    stage,
                    folder / "warm",
                    [3, 64, 64],
                    precision=precision,
                    batch_size=args.batch,
                    limit=args.batch,
                    device=args.device,
                    overwrite=True,
                )
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                start = time.perf_counter()
                manifest = cache_latents(
                    dataset,
                    stage,
                    folder / f"{name}_{precision}",
                    [3, 64, 64],
                    precision=precision,
                    batch_size=args.batch,
                    shard_size=4096,
                    device=args.device,
                )
                seconds = time.perf_counter() - start
                assert manifest["count"] == args.images and manifest["complete"]
                entry = {
                    "first_stage": name,
                    "precision": precision,
                    "images": args.images,
                    "seconds": round(seconds, 3),
                    "images_per_s": round(args.images / seconds, 1),
                    "latent_shape": manifest["latent_shape"],
                }
                results.append(entry)
                print(json.dumps(entry))
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    report = {
        "benchmark": "cache_latents",
        "command": " ".join([sys.executable, *sys.argv]),
        "device": args.device
        if not args.device.startswith("cuda")
        else torch.cuda.get_device_name(0),
        "cpu": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "data": "proc_blobs 64px, train split (rendered in-process), flips on (2 encodes/image)",
        "batch_size": args.batch,
        "data_pass_images_per_s": round(args.images / data_s, 1),
        "results": results,
        "note": "wall-clock on a shared machine; images/s counts source images (each + its flip)",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
