"""Equivariance error of latent flows (Song et al., NeurIPS 2023; spec latent_flow.md §9).

For test sequences x_0..x_S under transformation k:

    E_k = (1/N) Σ_n Σ_{t=1}^{S} Σ_{c,h,w} |Dec(Φ_k^t(μ(x_0^n))) − x_t^n|

with pixels in [0, 1] (the paper's unit: per-image L1 summed over pixels and steps). Also reported:
``/per_pixel`` (divided by S·C·H·W), the per-t curve and the mean over k. Every k is computed
independently (the original averaged over k' ≤ k). Weak variant: the flow index is k̂ = argmax R;
the oracle error uses the flow that R's Hungarian-matched labelling assigns to the true k.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from latentzoo.metrics.capabilities import require_capabilities
from latentzoo.utils.errors import LatentzooError
from latentzoo.utils.logging import RankedLogger

log = RankedLogger(__name__)


def sequence_batches(datamodule: Any, split: str) -> Any:
    """The datamodule's ``split`` loader of sequence batches (dicts with frames and k)."""
    if hasattr(datamodule, "setup"):
        datamodule.setup("test" if split == "test" else "validate")
    loader = getattr(datamodule, f"{split}_dataloader", None)
    if loader is None:
        raise LatentzooError(f"{type(datamodule).__name__} has no {split}_dataloader()")
    return loader()


def unpack_sequences(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(batch, dict) and "frames" in batch:
        return batch["frames"], batch["k"]
    if hasattr(batch, "frames"):
        return batch.frames, batch.k
    raise LatentzooError(
        "equivariance and sequence likelihoods need sequence batches {'frames', 'k'}; evaluate "
        "on a sequence dataset (data=mnist_seq, shapes3d_seq, falcor3d_seq, ...)"
    )


def path_errors(decoded: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
    """Summed L1 per step and sequence (S, B) between decoded (S+1, B, ...) and frames
    (B, S+1, ...); step 0 (the reconstruction) is excluded."""
    target = frames[:, 1:].transpose(0, 1)
    return (decoded[1:] - target).abs().flatten(2).sum(2)


def matched_accuracy(confusion: np.ndarray) -> tuple[float, np.ndarray]:
    """Accuracy after relabelling predictions by the Hungarian matching of the confusion matrix
    (rows: true k, columns: predicted). Returns the accuracy and true -> predicted index."""
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(-confusion)
    mapping = np.arange(confusion.shape[0])
    mapping[rows] = cols
    total = confusion.sum()
    return float(confusion[rows, cols].sum() / max(total, 1)), mapping


class _Accumulator:
    """Per-k running sums of the per-step error curve."""

    def __init__(self, num_k: int) -> None:
        self.sums: list[np.ndarray] = [np.zeros(0) for _ in range(num_k)]
        self.counts = np.zeros(num_k, dtype=np.int64)

    def add(self, k: int, errors: torch.Tensor) -> None:  # errors (S, n)
        per_t = errors.sum(1).double().cpu().numpy()
        if len(per_t) > len(self.sums[k]):
            self.sums[k] = np.pad(self.sums[k], (0, len(per_t) - len(self.sums[k])))
        self.sums[k][: len(per_t)] += per_t
        self.counts[k] += errors.shape[1]

    def report(self, pixels: int, prefix: str = "") -> dict[str, float]:
        out: dict[str, float] = {}
        totals, per_pixel = [], []
        for k, (sums, count) in enumerate(zip(self.sums, self.counts, strict=True)):
            if count == 0:
                continue
            curve = sums / count
            out[f"{prefix}E_k{k}"] = float(curve.sum())
            out[f"{prefix}E_k{k}/per_pixel"] = float(curve.sum() / (len(curve) * pixels))
            for t, value in enumerate(curve, start=1):
                out[f"{prefix}E_k{k}/t{t}"] = float(value)
            totals.append(out[f"{prefix}E_k{k}"])
            per_pixel.append(out[f"{prefix}E_k{k}/per_pixel"])
        if totals:
            out[f"{prefix}E_mean"] = float(np.mean(totals))
            out[f"{prefix}E_mean/per_pixel"] = float(np.mean(per_pixel))
        return out


class EquivarianceError:
    """``metrics=equivariance`` in eval.py: E_k per transformation on the datamodule's test
    sequences, z_0 = μ(x_0), with a fixed seed. ``max_per_k`` caps N per k (null: all)."""

    requires = ("encode", "decode", "transform")

    def __init__(
        self,
        seed: int = 0,
        split: str = "test",
        max_per_k: int | None = None,
        log_every: int = 50,
    ) -> None:
        self.seed, self.split, self.max_per_k, self.log_every = seed, split, max_per_k, log_every

    def _is_weak(self, model: Any) -> bool:
        return getattr(model, "variant", "supervised") == "weak"

    def _pass(self, model: Any, datamodule: Any, flow_index: Any) -> tuple[_Accumulator, Any]:
        """One pass over the sequences; ``flow_index(frames, k)`` picks the flow per sequence."""
        num_k = int(model.num_transforms)
        acc = _Accumulator(num_k)
        confusion = np.zeros((num_k, num_k), dtype=np.int64)
        pixels = 0
        device = next(model.parameters()).device
        started = time.perf_counter()
        for i, batch in enumerate(sequence_batches(datamodule, self.split), start=1):
            frames, k = unpack_sequences(batch)
            frames, k = frames.to(device).float(), k.to(device).long()
            if self.max_per_k is not None:
                room = torch.as_tensor(self.max_per_k - acc.counts, device=device)[k]
                rank = torch.zeros_like(k)
                for kk in k.unique():  # keep the first `room` sequences of each k
                    mask = k == kk
                    rank[mask] = torch.arange(int(mask.sum()), device=device)
                keep = rank < room
                frames, k = frames[keep], k[keep]
                if len(k) == 0:
                    if (acc.counts >= self.max_per_k).all():
                        break
                    continue
            chosen = flow_index(frames, k)
            for true_k, pred_k in zip(k.tolist(), chosen.tolist(), strict=True):
                confusion[true_k, pred_k] += 1
            decoded = model.transform(frames[:, 0], chosen, frames.shape[1] - 1)
            errors = path_errors(decoded, frames)
            pixels = int(np.prod(frames.shape[2:]))
            for kk in k.unique().tolist():
                acc.add(kk, errors[:, k == kk])
            if self.log_every and i % self.log_every == 0:
                log.info(
                    f"equivariance: {int(acc.counts.sum())} sequences in "
                    f"{time.perf_counter() - started:.1f} s"
                )
        if acc.counts.sum() == 0:
            raise LatentzooError(f"equivariance: the {self.split} split has no sequences")
        return acc, (confusion, pixels)

    def __call__(self, model: Any, datamodule: Any) -> dict[str, float]:
        require_capabilities(model, self.requires, "equivariance")
        was_training = model.training
        model.eval()
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed)
                if not self._is_weak(model):
                    acc, (_, pixels) = self._pass(model, datamodule, lambda frames, k: k)
                    return acc.report(pixels)
                acc, (confusion, pixels) = self._pass(
                    model, datamodule, lambda frames, k: model.predict_transform(frames)
                )
                accuracy, mapping = matched_accuracy(confusion)
                scores = acc.report(pixels)
                scores["index_accuracy"] = accuracy
                mapping_t = torch.as_tensor(mapping)
                torch.manual_seed(self.seed)
                oracle, _ = self._pass(
                    model, datamodule, lambda frames, k: mapping_t.to(k.device)[k]
                )
                scores.update(oracle.report(pixels, prefix="oracle/"))
                return scores
        finally:
            model.train(was_training)
