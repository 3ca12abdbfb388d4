"""Throughput of the procedural renderers (images/s), per batch size and thread count.

Renders whole batches of uniformly sampled factors with ``images_of`` (float32, what a training
step consumes) and ``images_u8_of`` (uint8), with torch intra-op threads = 1 and = all, and times
the one-off construction (lookup / layer tables). Targets, measured here and never asserted in
tests: proc_dsprites >= 10,000 images/s per core (``shared/specs/datasets.md`` §11),
proc_shapes3d >= 5,000 images/s per core at batch 256.

Usage::

    python benchmarks/bench_proc_renderers.py [--dataset proc_dsprites proc_shapes3d]
        [--out-dir benchmarks/results]      # writes <out-dir>/<dataset>.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from latentzoo.data.datasets import ProcDSprites, ProcShapes3D

DEFAULT_OUT_DIR = Path(__file__).resolve().parent / "results"
RENDERERS = {"proc_dsprites": (ProcDSprites, 10000), "proc_shapes3d": (ProcShapes3D, 5000)}


def images_per_second(
    fn: Callable[[np.ndarray], torch.Tensor], factors: np.ndarray, seconds: float, repeats: int
) -> float:
    """Best-of-``repeats`` throughput of ``fn(factors)`` over runs of about ``seconds`` each."""
    fn(factors)  # warm-up (allocator, caches)
    best = 0.0
    for _ in range(repeats):
        count, start = 0, time.perf_counter()
        while True:
            fn(factors)
            count += len(factors)
            elapsed = time.perf_counter() - start
            if elapsed >= seconds:
                break
        best = max(best, count / elapsed)
    return best


def construction_seconds(make: Callable[[], object], repeats: int) -> float:
    """Best-of-``repeats`` wall time of building the dataset (its render tables)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        make()
        best = min(best, time.perf_counter() - start)
    return best


def run(
    name: str, size: str, batch_sizes: list[int], seconds: float, repeats: int, seed: int
) -> dict[str, object]:
    """Measure every (threads, batch size, output dtype) combination; return a JSON-able dict."""
    cls, target = RENDERERS[name]
    ds = cls(size=size)
    rng = np.random.default_rng(seed)
    all_threads = os.cpu_count() or 1
    default_threads = torch.get_num_threads()
    results, init = [], {}
    try:
        for threads in sorted({1, all_threads}):
            torch.set_num_threads(threads)
            init[str(threads)] = round(construction_seconds(lambda: cls(size=size), repeats), 4)
            print(f"{name} threads={threads:2d} construction {init[str(threads)]:.3f} s")
            for bs in batch_sizes:
                factors = ds.sample_factors(bs, rng)
                for dtype, fn in (("float32", ds.images_of), ("uint8", ds.images_u8_of)):
                    ips = images_per_second(fn, factors, seconds, repeats)
                    results.append(
                        {
                            "threads": threads,
                            "batch_size": bs,
                            "dtype": dtype,
                            "images_per_s": round(ips, 1),
                            "images_per_s_per_thread": round(ips / threads, 1),
                        }
                    )
                    print(
                        f"{name} threads={threads:2d} batch={bs:5d} {dtype:7s} "
                        f"{ips:10.0f} img/s ({ips / threads:8.0f} per thread)",
                        flush=True,
                    )
    finally:
        torch.set_num_threads(default_threads)
    return {
        "dataset": f"{name}[{size}]",
        "target_images_per_s_per_core": target,
        "construction_seconds_by_threads": init,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "cpu_count": all_threads,
        "load_avg_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "seconds_per_run": seconds,
        "repeats": repeats,
        "results": results,
    }


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, run the benchmarks, print and write one JSON report per renderer."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--dataset", nargs="+", choices=sorted(RENDERERS), default=sorted(RENDERERS))
    p.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR, help="JSON output folder")
    p.add_argument("--size", choices=("full", "small"), default="full")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 256, 1024])
    p.add_argument("--seconds", type=float, default=1.0, help="duration of one timed run")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per setting (best kept)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for name in args.dataset:
        report = run(name, args.size, args.batch_sizes, args.seconds, args.repeats, args.seed)
        out = args.out_dir / f"{name}.json"
        out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
