"""Train-step time of LatentFlow per sequence length: Lightning vs a bare PyTorch loop.

The same model, batch and optimizer are stepped ``--steps`` times by ``trainer.fit`` (no logger,
checkpointing, progress bar or validation) and by a plain ``zero_grad / step / backward / step``
loop; the overhead is (Lightning − bare) / bare of the median step time. Target: <= 3 %.
The loss itself (S double-backward passes plus one Hessian-vector product per step) dominates,
so the per-step cost grows about linearly in S.

Usage::

    python benchmarks/bench_latent_flow.py                       # tiny, CPU (a functional check)
    python benchmarks/bench_latent_flow.py --size 28 --latent 324 --batch 128 --device cuda
        [--seq-lens 2 5 10] [--steps 30] [--out benchmarks/results/latent_flow.json]
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import statistics
import time
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from latentzoo.models import LatentFlow
from latentzoo.models.nets.flow_conv import FlowConvDecoder, FlowConvEncoder
from latentzoo.models.nets.potential import PotentialMLP

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "latent_flow.json"


class FixedBatches(Dataset):
    """The same pre-made batch ``length`` times (no data cost in either loop)."""

    def __init__(self, batch: dict, length: int) -> None:
        self.batch, self.length = batch, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict:
        return self.batch


def build(args: argparse.Namespace, seq_len: int, variant: str) -> LatentFlow:
    shape = [3, args.size, args.size]
    channels = None if args.full_nets else [8, 16]
    hidden = None if args.full_nets else 64
    return LatentFlow(
        encoder=FlowConvEncoder(shape, 2 * args.latent, channels, hidden),
        decoder=FlowConvDecoder(shape, args.latent, channels, hidden),
        potential=functools.partial(PotentialMLP, dim=args.latent, time_scale=1000),
        latent_dim=args.latent,
        num_transforms=3,
        seq_len=seq_len,
        image_shape=shape,
        variant=variant,
        index_net=functools.partial(FlowConvEncoder, channels=channels, hidden=hidden),
        optimizer=functools.partial(torch.optim.Adam, lr=1e-4),
    )


def make_batch(args: argparse.Namespace, seq_len: int) -> dict:
    frames = torch.rand(args.batch, seq_len + 1, 3, args.size, args.size)
    return {"frames": frames, "k": torch.full((args.batch,), 1, dtype=torch.long)}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class StepTimer(L.Callback):
    """Time between consecutive batch ends: the whole loop cycle (fetch, transfer, hooks, step,
    logging), so nothing Lightning does between steps escapes the measurement."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.times, self._last = device, [], None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        sync(self.device)
        now = time.perf_counter()
        if self._last is not None:
            self.times.append(now - self._last)
        self._last = now


def time_lightning(args, seq_len: int, variant: str, device: torch.device) -> list[float]:
    torch.manual_seed(0)
    model = build(args, seq_len, variant)
    batch = make_batch(args, seq_len)
    timer = StepTimer(device)
    trainer = L.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=1,
        max_steps=args.warmup + args.steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[timer],
    )
    loader = DataLoader(FixedBatches(batch, args.warmup + args.steps), batch_size=None)
    trainer.fit(model, train_dataloaders=loader)
    return timer.times[args.warmup - 1 :]


def time_bare(args, seq_len: int, variant: str, device: torch.device) -> list[float]:
    torch.manual_seed(0)
    model = build(args, seq_len, variant).to(device)
    optimizer = model.configure_optimizers()
    batch = make_batch(args, seq_len)
    times = []
    for i in range(args.warmup + args.steps):
        sync(device)
        start = time.perf_counter()
        on_device = {key: value.to(device) for key, value in batch.items()}
        loss = model.step(on_device, "train")["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        sync(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[2, 5, 10])
    parser.add_argument("--size", type=int, default=28)
    parser.add_argument("--latent", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--variant", default="supervised", choices=["supervised", "weak"])
    parser.add_argument("--full-nets", action="store_true", help="the spec's conv widths")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    device = torch.device(args.device)

    results = []
    for seq_len in args.seq_lens:
        # alternate the two loops twice, keep the faster run of each (less noise from neighbours)
        bare = min(
            statistics.median(time_bare(args, seq_len, args.variant, device)) for _ in range(2)
        )
        lightning = min(
            statistics.median(time_lightning(args, seq_len, args.variant, device)) for _ in range(2)
        )
        overhead = 100 * (lightning - bare) / bare
        results.append(
            {
                "seq_len": seq_len,
                "bare_step_s": bare,
                "lightning_step_s": lightning,
                "overhead_percent": overhead,
                "sequences_per_s": args.batch / lightning,
            }
        )
        print(
            f"S={seq_len:3d}  bare {1000 * bare:8.2f} ms  lightning {1000 * lightning:8.2f} ms  "
            f"overhead {overhead:+6.2f} %"
        )
    report = {
        "benchmark": "latent_flow train step, Lightning vs bare loop",
        "target_overhead_percent": 3.0,
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else platform.processor(),
        "torch": torch.__version__,
        "lightning": L.__version__,
        "threads": torch.get_num_threads(),
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
