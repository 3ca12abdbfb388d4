"""Sampling images for FID: labels, shards, seeds, precision, NFE bookkeeping.

Sharding: the ``num_samples`` images form batches of ``batch_size`` (global sample indices
``[b·B, (b+1)·B)``); rank r draws the batches b ≡ r (mod world size), each under its own seed
(``seed``, b), with the labels of its indices. A batch is thus the same images whatever the
world size, and 1 rank and N ranks score the same set.
"""

from __future__ import annotations

import contextlib
import inspect
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from latentzoo.metrics.generative.imaging import to_uint8
from latentzoo.metrics.generative.metric import GenerativeMetrics
from latentzoo.metrics.generative.progress import dist_info, progress_bar
from latentzoo.models.base import eval_mode
from latentzoo.utils.errors import LatentzooError
from latentzoo.utils.logging import RankedLogger

log = RankedLogger(__name__, rank_zero_only=True)

PRECISIONS = ("fp32", "bf16")


def sample_labels(n: int, num_classes: int, mode: str, generator: torch.Generator) -> torch.Tensor:
    """``balanced``: every class n // C times (+ a random remainder), shuffled; ``uniform``: iid."""
    if mode == "uniform":
        return torch.randint(num_classes, (n,), generator=generator)
    if mode != "balanced":
        raise LatentzooError(f"labels must be balanced or uniform, got {mode!r}")
    base = torch.arange(num_classes).repeat(n // num_classes)
    rest = torch.randperm(num_classes, generator=generator)[: n - base.numel()]
    labels = torch.cat([base, rest])
    return labels[torch.randperm(n, generator=generator)]


def shard_batches(num_samples: int, batch_size: int, rank: int, world: int) -> list[range]:
    """This rank's batches of global sample indices (see the module docstring)."""
    starts = range(rank * batch_size, num_samples, world * batch_size)
    return [range(s, min(s + batch_size, num_samples)) for s in starts]


def batch_seed(seed: int, batch_index: int) -> int:
    """An independent seed per (run seed, global batch index)."""
    return int(np.random.SeedSequence([seed, batch_index]).generate_state(1, np.uint64)[0] >> 1)


def precision_context(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """``fp32``: as is; ``bf16``: ``torch.autocast`` in bfloat16 around ``model.sample`` (models
    keep their decoder in fp32 themselves)."""
    if precision not in PRECISIONS:
        raise LatentzooError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def sample_call_kwargs(model: nn.Module, kwargs: dict[str, Any], labelled: bool) -> bool:
    """Check ``kwargs`` (the non-None sampling options) against ``model.sample``'s signature;
    return whether labels can be passed."""
    parameters = inspect.signature(model.sample).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return labelled
    accepted = {p.name for p in parameters}
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise LatentzooError(
            f"{type(model).__name__}.sample() takes no {', '.join(unknown)}; drop "
            + " ".join(f"{k}=" for k in unknown)
            + " for this checkpoint"
        )
    if labelled and "labels" not in accepted:
        log.warning(f"{type(model).__name__}.sample() takes no labels: sampling unconditionally")
        return False
    return labelled


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class SampleCounter:
    """Sums NFE, net forwards, images and seconds of ``model.sample`` calls; ``summary`` reduces
    them over ranks (sums, and the slowest rank's seconds)."""

    def __init__(self) -> None:
        self.nfe = self.net_forwards = self.calls = self.forward_calls = 0.0
        self.images, self.seconds = 0, 0.0

    def add(self, model: nn.Module, images: int, seconds: float) -> None:
        self.images += images
        self.seconds += seconds
        nfe, forwards = getattr(model, "last_nfe", None), getattr(model, "last_net_forwards", None)
        if nfe is not None:
            self.nfe, self.calls = self.nfe + float(nfe), self.calls + 1
        if forwards is not None:
            self.net_forwards += float(forwards)
            self.forward_calls += 1

    def summary(self, device: torch.device) -> dict[str, float]:
        sums = [self.nfe, self.calls, self.net_forwards, self.forward_calls, float(self.images)]
        seconds = self.seconds
        if dist_info()[1] > 1:
            total = torch.tensor(sums + [seconds], dtype=torch.float64, device=device)
            slowest = total[-1:].clone()
            torch.distributed.all_reduce(total)
            torch.distributed.all_reduce(slowest, op=torch.distributed.ReduceOp.MAX)
            sums, seconds = total[:-1].tolist(), float(slowest)
        nfe, calls, forwards, forward_calls, images = sums
        out = {
            "sampling_seconds": seconds,
            "images_per_second": images / seconds if seconds > 0 else float("nan"),
        }
        if calls:
            out["nfe"] = nfe / calls  # mean per sample() call, i.e. per batch
        if forward_calls:
            out["net_forwards"] = forwards / forward_calls
        return out


@torch.no_grad()
def generate(
    model: nn.Module,
    sink: Callable[[torch.Tensor, range], None],
    num_samples: int,
    batch_size: int,
    num_classes: int = 0,
    labels: str = "balanced",
    sample_kwargs: dict[str, Any] | None = None,
    seed: int = 0,
    precision: str = "fp32",
) -> dict[str, float]:
    """Sample this rank's share of ``num_samples`` images (model in eval mode, on its device),
    handing each uint8 batch and its global indices to ``sink``; return NFE, net forwards and
    timing over all ranks (:class:`SampleCounter`)."""
    rank, world = dist_info()
    device = next(model.parameters()).device
    autocast = precision_context(precision, device)  # checked before any work
    all_labels = None
    if num_classes:
        all_labels = sample_labels(
            num_samples, num_classes, labels, torch.Generator().manual_seed(seed)
        )
    kwargs = {k: v for k, v in (sample_kwargs or {}).items() if v is not None}
    if not sample_call_kwargs(model, kwargs, all_labels is not None):
        all_labels = None
    batches = shard_batches(num_samples, batch_size, rank, world)
    counter = SampleCounter()
    devices = [device.index or 0] if device.type == "cuda" else []
    with eval_mode(model), torch.random.fork_rng(devices=devices), progress_bar() as bar:
        task = bar.add_task("sampling", total=sum(len(b) for b in batches))
        for chunk in batches:
            call = dict(kwargs)
            if all_labels is not None:
                call["labels"] = all_labels[chunk.start : chunk.stop].to(device)
            torch.manual_seed(batch_seed(seed, chunk.start // batch_size))
            _sync(device)
            began = time.perf_counter()
            with autocast:
                images = model.sample(len(chunk), **call)
            _sync(device)
            counter.add(model, len(chunk), time.perf_counter() - began)
            sink(to_uint8(images.float() if images.is_floating_point() else images), chunk)
            bar.update(task, advance=len(chunk))
    return counter.summary(device)


def generate_into(
    model: nn.Module,
    metrics: GenerativeMetrics,
    num_samples: int,
    batch_size: int,
    num_classes: int = 0,
    labels: str = "balanced",
    sample_kwargs: dict[str, Any] | None = None,
    seed: int = 0,
    writers: list[Any] | None = None,
    precision: str = "fp32",
) -> dict[str, float]:
    """:func:`generate` into the fake state of ``metrics`` (and the sample ``writers``)."""
    writers = writers or []

    def sink(images: torch.Tensor, chunk: range) -> None:
        metrics.add_fake(images, chunk)
        if writers:
            array = images.permute(0, 2, 3, 1).cpu().numpy()
            for writer in writers:
                writer.write(array, chunk)

    try:
        return generate(
            model,
            sink,
            num_samples,
            batch_size,
            num_classes,
            labels,
            sample_kwargs,
            seed,
            precision,
        )
    finally:
        for writer in writers:
            writer.close()
