"""Checkpoint size of latent_fm with and without the frozen first stage's weights.

Lean checkpoints (``LatentFlowMatching.state_dict``) leave out a first stage that its config
rebuilds (a pretrained file), and record its fingerprint instead. This script builds
``model=latent_fm model/autoencoder=kl_f4`` (latentzoo's KL autoencoder, loaded from a
``model=kl_autoencoder`` checkpoint as a real run would) with ``--backbone``, takes one AdamW
step through Lightning, and saves the checkpoint twice: lean (now) and with the first stage
stored (before). It also counts the SD VAE's parameters (diffusers ``AutoencoderKL`` with
sd-vae-ft-mse's architecture, built on the meta device, no download) to state what each
checkpoint of a paper experiment saves; ``--diffusers-path`` adds a folder holding diffusers to
``sys.path`` when it is not installed (``pip install --target DIR diffusers``).

Usage::

    python benchmarks/bench_checkpoint_size.py [--backbone dit_s2] [--image-size 64]
        [--diffusers-path DIR] [--out benchmarks/results/checkpoint_size_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

import hydra
import lightning as L
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, TensorDataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "checkpoint_size_cpu.json"

# stabilityai/sd-vae-ft-mse's config.json (the architecture only; weights are not needed)
SD_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 256,
}


def sd_vae_parameters(diffusers_path: str | None) -> dict:
    if diffusers_path:
        sys.path.insert(0, diffusers_path)
    try:
        from diffusers import AutoencoderKL
    except ImportError:
        return {"measured": False, "why": "diffusers not importable (use --diffusers-path)"}
    with torch.device("meta"):
        vae = AutoencoderKL(**SD_VAE)
    count = sum(p.numel() for p in vae.parameters())
    return {"measured": True, "parameters": count, "fp32_mb": round(count * 4 / 2**20, 1)}


def paper_estimates(bytes_per_param: float, sd_vae: dict) -> dict:
    """Lean vs stored-VAE checkpoint sizes of the paper's DiTs (latent_fm.md §4 counts), from
    the bytes per net parameter measured here (weights, EMA copy, two AdamW moments)."""
    if not sd_vae.get("measured"):
        return {}
    vae = sd_vae["parameters"] * 4 / 2**20
    out = {}
    for name, params in (("DiT-L/2", 456.8e6), ("DiT-B/2 (1000 classes)", 130.3e6)):
        lean = params * bytes_per_param / 2**20
        out[name] = {"lean": round(lean), "with_sd_vae": round(lean + vae)}
    return {"bytes_per_net_parameter": round(bytes_per_param, 2), **out}


def build(args: argparse.Namespace, folder: Path):
    from latentzoo.models import KLAutoencoder
    from latentzoo.utils.checkpoint import CHECKPOINT_KEY
    from tests.conftest import compose_config

    overrides = [
        "model=latent_fm",
        f"model/backbone={args.backbone}",
        "model/autoencoder=kl_f4",
        "data=proc_blobs",
        f"data.image_size={args.image_size}",
    ]
    cfg = compose_config("train", overrides, folder / "cfg")
    net_cfg = OmegaConf.to_container(cfg.model.autoencoder.net, resolve=True)
    stage1 = KLAutoencoder(hydra.utils.instantiate(net_cfg))  # stage 1 as training writes it
    config = {"model": {"_target_": "latentzoo.models.KLAutoencoder", "net": net_cfg}}
    kl_file = folder / "kl_f4.ckpt"
    torch.save({"state_dict": stage1.state_dict(), CHECKPOINT_KEY: {"config": config}}, kl_file)
    cfg.model.autoencoder.ckpt_path = str(kl_file)
    return cfg, hydra.utils.instantiate(cfg.model)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbone", default="dit_s2")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--diffusers-path", default=None)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    torch.manual_seed(0)

    with tempfile.TemporaryDirectory(prefix="bench_ckpt_size_") as tmp:
        folder = Path(tmp)
        cfg, model = build(args, folder)
        images = torch.rand(4, 3, args.image_size, args.image_size)
        loader = DataLoader(TensorDataset(images, torch.zeros(4, dtype=torch.long)), batch_size=4)
        trainer = L.Trainer(
            accelerator="cpu",
            max_steps=1,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
            default_root_dir=folder,
        )
        trainer.fit(model, loader)
        sizes, keys = {}, {}
        for name, lean in (("lean", True), ("with_first_stage", False)):
            model.first_stage.rebuilt_from_config = lean  # "before": the stage is stored
            path = folder / f"{name}.ckpt"
            trainer.save_checkpoint(path)
            sizes[name] = path.stat().st_size
            keys[name] = sum(
                k.startswith("first_stage.")
                for k in torch.load(path, weights_only=False)["state_dict"]
            )
        model.first_stage.rebuilt_from_config = True
        count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
        stage_bytes = sum(
            t.numel() * t.element_size() for t in model.first_stage.state_dict().values()
        )

    sd_vae = sd_vae_parameters(args.diffusers_path)
    mb = lambda n: round(n / 2**20, 3)  # noqa: E731
    result = {
        "benchmark": "checkpoint_size",
        "units": "*_mb are MiB (2^20 bytes)",
        "command": " ".join(["python", *sys.argv]),
        "model": {
            "config": f"model=latent_fm model/backbone={args.backbone} model/autoencoder=kl_f4 "
            f"data=proc_blobs data.image_size={args.image_size}",
            "latent_shape": model.latent_shape,
            "net_parameters": count(model.net),
            "first_stage_parameters": count(model.first_stage),
            "first_stage_state_mb": mb(stage_bytes),
            "checkpoint_holds": "weights, EMA copy of the net, AdamW moments, loop state, config",
        },
        "checkpoint_mb": {name: mb(size) for name, size in sizes.items()},
        "first_stage_keys": keys,
        "saved_mb": mb(sizes["with_first_stage"] - sizes["lean"]),
        "sd_vae": {
            **sd_vae,
            "note": "what each checkpoint of a paper experiment (model/autoencoder=sd_vae) no "
            "longer stores: the VAE's fp32 weights",
        },
        "paper_checkpoints_mb": paper_estimates(sizes["lean"] / count(model.net), sd_vae),
        "machine": {
            "device": "cpu",
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "lightning": L.__version__,
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("model", "checkpoint_mb", "sd_vae")}, indent=2))


if __name__ == "__main__":
    main()
