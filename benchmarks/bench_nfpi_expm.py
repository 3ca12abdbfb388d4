"""NFPI flow step time: matrix exponentials by ``torch.linalg.matrix_exp`` vs the sync-free
Taylor forms (issue 19, target 4), at equal log-likelihood.

Builds the CIFAR-sized MEF flow (3 levels, 8 steps, blocks [8, 4, 2], hidden 128), data-inits it
and trains it a few Adamax steps (so the couplings are not the identity), then:
* bits/dim of a fixed batch with both ``expm`` settings (same weights, mid-point dequantisation);
* forward + backward + optimizer step time, the two settings interleaved step by step.
On CUDA it also counts host synchronisations per step (``torch.cuda.set_sync_debug_mode``).

    python benchmarks/bench_nfpi_expm.py                       # CPU, batch 16
    python benchmarks/bench_nfpi_expm.py --batch 512 --device cuda --out nfpi_expm_h100.json
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

from latentzoo.models.nets.glow import Glow

RESULTS = Path(__file__).parent / "results"


def bits_per_dim(flow: Glow, x: torch.Tensor) -> torch.Tensor:
    """Per-image bits/dim under a standard normal prior (the flow part of the NFPI NLL)."""
    y = 2 * (x * 255 + 0.5) / 256 - 1
    z, logdet = flow(y)
    d = x[0].numel()
    log_pz = -0.5 * (z.flatten(1) ** 2 + math.log(2 * math.pi)).sum(1)
    return -(log_pz + logdet - d * math.log(128)) / (d * math.log(2))


def step(flow: Glow, opt: torch.optim.Optimizer, x: torch.Tensor) -> float:
    opt.zero_grad(set_to_none=True)
    loss = bits_per_dim(flow, x).mean()
    loss.backward()
    opt.step()
    return float(loss.detach())


def count_syncs(flow: Glow, opt: torch.optim.Optimizer, x: torch.Tensor) -> int:
    """Host synchronisations in one step (CUDA only): each one warns in sync-debug mode."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            opt.zero_grad(set_to_none=True)
            bits_per_dim(flow, x).mean().backward()
            opt.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--train-steps", type=int, default=5)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--blocks", type=int, nargs=3, default=[8, 4, 2])
    parser.add_argument("--init-images", type=int, default=256)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    x = torch.randint(0, 256, (args.batch, 3, 32, 32), generator=torch.Generator().manual_seed(1))
    x = (x.float() / 255).to(device)

    flows = {
        kind: Glow((3, 32, 32), blocks=args.blocks, hidden=args.hidden, expm=kind).to(device)
        for kind in ("torch", "taylor")
    }
    ref = flows["torch"]
    init = torch.randint(0, 256, (args.init_images, 3, 32, 32), generator=torch.Generator())
    init = init.float().div(255).to(device)  # the data init needs more images than a batch
    with torch.no_grad():
        ref.data_init(2 * (init * 255 + torch.rand_like(init)) / 256 - 1)
    opt = torch.optim.Adamax(ref.parameters(), lr=1e-4)
    for _ in range(args.train_steps):  # move off the identity couplings
        step(ref, opt, x)
    flows["taylor"].load_state_dict(ref.state_dict())

    with torch.no_grad():
        bpd = {kind: bits_per_dim(flow, x).double() for kind, flow in flows.items()}
    bpd_diff = float((bpd["torch"] - bpd["taylor"]).abs().max())

    opts = {k: torch.optim.Adamax(f.parameters(), lr=1e-6) for k, f in flows.items()}
    times: dict[str, list[float]] = {k: [] for k in flows}
    for kind in flows:  # warm-up
        step(flows[kind], opts[kind], x)
    for _ in range(args.repeats):
        for kind in flows:  # interleaved, so load changes on a shared machine hit both
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            step(flows[kind], opts[kind], x)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[kind].append(time.perf_counter() - start)
    syncs = (
        {k: count_syncs(f, opts[k], x) for k, f in flows.items()} if device.type == "cuda" else None
    )

    median = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "benchmark": "nfpi_expm",
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "flow": f"CIFAR MEF: levels 3, steps [8, 8, 8], blocks {args.blocks}, hidden {args.hidden}",
        "batch": args.batch,
        "repeats": args.repeats,
        "step_s": {k: {"median": median[k], "all": v} for k, v in times.items()},
        "speedup_taylor_over_torch": median["torch"] / median["taylor"],
        "bpd_fixed_batch": {k: float(v.mean()) for k, v in bpd.items()},
        "bpd_max_abs_diff": bpd_diff,
        "host_syncs_per_step": syncs,
    }
    out = RESULTS / (args.out or f"nfpi_expm_{device.type}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "step_s"} | {"median": median}))


if __name__ == "__main__":
    main()
