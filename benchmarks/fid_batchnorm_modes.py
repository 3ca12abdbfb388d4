"""FID of a checkpoint's samples under two BatchNorm protocols (soft_intro_vae.md §7).

``eval``: latentzoo's protocol, running statistics (what ``eval.py metrics=fid`` does).
``train``: the original Soft-IntroVAE FID code, which left the decoder in train mode, so each
sample batch is normalised by its own statistics and the score depends on the batch size.

    python benchmarks/fid_batchnorm_modes.py <ckpt> --weights <inception.pt> [--num-samples 10000]
Writes benchmarks/results/fid_batchnorm_modes.json (or --out).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import hydra
import torch
from torch import nn

from latentzoo.metrics.generative import FIDEvaluator
from latentzoo.utils.checkpoint import checkpoint_config, load_checkpoint
from latentzoo.utils.distributed import instantiate_datamodule


class TrainModeBatchNorm(nn.Module):
    """``sample(n)`` as the original FID code: decoder BatchNorm on each batch's statistics."""

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae = vae

    @torch.no_grad()
    def sample(self, n: int) -> torch.Tensor:
        self.vae.train()
        z = torch.randn(n, self.vae.latent_dim, device=self.vae.device)
        return self.vae.decode(z).clamp(0, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ckpt")
    parser.add_argument("--weights", default=None, help="Inception weights (see metrics/fid.yaml)")
    parser.add_argument("--num-samples", type=int, default=10_000)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 100, 500])
    parser.add_argument("--stats-dir", default="data/fid_stats")
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "fid_batchnorm_modes.json"
    )
    args = parser.parse_args()

    checkpoint = load_checkpoint(args.ckpt)
    cfg = checkpoint_config(checkpoint, args.ckpt)
    model = hydra.utils.instantiate(cfg.model)
    model.load_state_dict(checkpoint["state_dict"])
    model.to("cuda" if torch.cuda.is_available() else "cpu")
    datamodule = instantiate_datamodule(cfg.data)

    results = {
        "ckpt": str(args.ckpt),
        "data": cfg.data.get("name"),
        "num_samples": args.num_samples,
    }
    for mode, sampler in [("eval", model), ("train", TrainModeBatchNorm(model))]:
        for batch in args.batch_sizes:
            torch.manual_seed(0)
            evaluator = FIDEvaluator(
                num_samples=args.num_samples,
                batch_size=batch,
                weights_path=args.weights,
                kid_subset_size=min(1000, args.num_samples),
                stats_dir=args.stats_dir,
                seed=0,
            )
            scores = evaluator(model=sampler, datamodule=datamodule)
            results[f"{mode}_bn_batch{batch}"] = {k: scores[k] for k in ("fid", "kid_mean")}
            print(mode, batch, results[f"{mode}_bn_batch{batch}"], flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
