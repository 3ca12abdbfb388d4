"""Throughput of the procedural 3D Shapes renderer (images/s), per batch size and thread count.

Renders whole batches of uniformly sampled factors with ``ProcShapes3D.images_of`` (float32, what
a training step consumes) and ``images_u8_of`` (uint8), with torch intra-op threads = 1 and = all,
and times the one-off construction (rendering the layers of the 480 scale x shape x orientation
combinations). The target in the task brief is >= 5,000 images/s per core at batch 256; it is
measured here and never asserted in tests.

Usage::

    python benchmarks/bench_proc_shapes3d.py [--out benchmarks/results/proc_shapes3d.json]
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

from latentzoo.data.datasets import ProcShapes3D

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "proc_shapes3d.json"
TARGET_PER_CORE = 5000


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


def construction_seconds(size: str, repeats: int) -> float:
    """Best-of-``repeats`` wall time of ``ProcShapes3D(size)`` (renders the layer tables)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        ProcShapes3D(size=size)  # type: ignore[arg-type]
        best = min(best, time.perf_counter() - start)
    return best


def run(
    size: str, batch_sizes: list[int], seconds: float, repeats: int, seed: int
) -> dict[str, object]:
    """Measure every (threads, batch size, output dtype) combination; return a JSON-able dict."""
    ds = ProcShapes3D(size=size)  # type: ignore[arg-type]
    rng = np.random.default_rng(seed)
    all_threads = os.cpu_count() or 1
    thread_counts = sorted({1, all_threads})
    default_threads = torch.get_num_threads()
    results = []
    init = {}
    try:
        for threads in thread_counts:
            torch.set_num_threads(threads)
            init[str(threads)] = round(construction_seconds(size, repeats), 4)
            print(f"threads={threads:2d} construction {init[str(threads)]:.3f} s", flush=True)
            for bs in batch_sizes:
                factors = ds.sample_factors(bs, rng)
                for name, fn in (("float32", ds.images_of), ("uint8", ds.images_u8_of)):
                    ips = images_per_second(fn, factors, seconds, repeats)
                    results.append(
                        {
                            "threads": threads,
                            "batch_size": bs,
                            "dtype": name,
                            "images_per_s": round(ips, 1),
                            "images_per_s_per_thread": round(ips / threads, 1),
                        }
                    )
                    print(
                        f"threads={threads:2d} batch={bs:5d} {name:7s} "
                        f"{ips:10.0f} img/s ({ips / threads:8.0f} per thread)",
                        flush=True,
                    )
    finally:
        torch.set_num_threads(default_threads)
    return {
        "dataset": f"proc_shapes3d[{size}]",
        "target_images_per_s_per_core": TARGET_PER_CORE,
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


def main(argv: list[str] | None = None) -> dict[str, object]:
    """Parse arguments, run the benchmark, print and write the JSON report."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON output path")
    p.add_argument("--size", choices=("full", "small"), default="full")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 256, 1024])
    p.add_argument("--seconds", type=float, default=1.0, help="duration of one timed run")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per setting (best kept)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    report = run(args.size, args.batch_sizes, args.seconds, args.repeats, args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
