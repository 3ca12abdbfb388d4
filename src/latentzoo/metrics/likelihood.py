"""Approximate negative log-likelihood of latent-variable models (spec latent_flow.md §9).

Static: NLL_0(x) = −log (1/M) Σ_m p(x|z_m) N(z_m; 0, I) / q(z_m|x), z_m ~ q(z|x); M = 1 is the
negative ELBO, larger M the IWAE bound. The sign is the correct one: −log p(x|z) − log p(z) +
log q(z|x) (the original code added the KL with the wrong sign). Lower is better.

Transformed (models with ``log_prob_sequence``): NLL_t(x_t) = −[log p(x_t|z_t) + log p_{k,t}(z_t)
− log q_t(z_t)] along the flow of k, averaged over t per k. An estimate, not a bound.

Reported in nats per image, nats per dimension and bits per dimension.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import torch

from latentzoo.metrics.capabilities import require_capabilities
from latentzoo.metrics.equivariance import sequence_batches, unpack_sequences
from latentzoo.utils.logging import RankedLogger

log = RankedLogger(__name__)


class ApproximateLikelihood:
    """``metrics=likelihood`` in eval.py. ``likelihood`` is p(x|z): ``bernoulli`` (the training
    likelihood) or ``gaussian_unit`` ([ORIGINAL] log N(x; x̂, I), with the −D/2·log 2π constant
    unless ``gaussian_constant: false``)."""

    requires = ("log_prob",)

    def __init__(
        self,
        num_samples: int = 64,
        likelihood: str = "bernoulli",
        gaussian_constant: bool = True,
        transformed: bool = True,
        seed: int = 0,
        split: str = "test",
        max_images: int | None = None,
        log_every: int = 50,
    ) -> None:
        if likelihood not in ("bernoulli", "gaussian_unit"):
            raise ValueError(
                f"likelihood must be 'bernoulli' or 'gaussian_unit', got '{likelihood}'"
            )
        self.num_samples, self.likelihood = num_samples, likelihood
        self.gaussian_constant, self.transformed = gaussian_constant, transformed
        self.seed, self.split, self.max_images, self.log_every = seed, split, max_images, log_every

    def __call__(self, model: Any, datamodule: Any) -> dict[str, float]:
        require_capabilities(model, self.requires, "likelihood")
        was_training = model.training
        model.eval()
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed)
                return self._evaluate(model, datamodule)
        finally:
            model.train(was_training)

    def _evaluate(self, model: Any, datamodule: Any) -> dict[str, float]:
        device = next(model.parameters()).device
        elbo, iwae, seen, dims = [], [], 0, 1
        sequence: dict[int, list[torch.Tensor]] = {}
        use_sequences = self.transformed and callable(getattr(model, "log_prob_sequence", None))
        weak = getattr(model, "variant", "supervised") == "weak"
        started = time.perf_counter()
        for i, batch in enumerate(sequence_batches(datamodule, self.split), start=1):
            if isinstance(batch, dict) or hasattr(batch, "frames"):
                frames, k = unpack_sequences(batch)
                frames, k = frames.to(device).float(), k.to(device).long()
                x = frames[:, 0]
            else:  # plain image datasets: static NLL only
                x = (batch[0] if isinstance(batch, list | tuple) else batch).to(device).float()
                frames = None
            if self.max_images is not None:
                x = x[: self.max_images - seen]
                frames = frames[: len(x)] if frames is not None else None
                k = k[: len(x)] if frames is not None else None
            if len(x) == 0:
                break
            dims = int(np.prod(x.shape[1:]))
            kwargs = {"likelihood": self.likelihood} if self.likelihood != "bernoulli" else {}
            elbo.append(-model.log_prob(x, num_samples=1, **kwargs).double().cpu())
            if self.num_samples > 1:
                iwae.append(
                    -model.log_prob(x, num_samples=self.num_samples, **kwargs).double().cpu()
                )
            if use_sequences and frames is not None and frames.shape[1] > 1:
                flow_k = model.predict_transform(frames) if weak else k
                nll_t = -model.log_prob_sequence(frames, flow_k, **kwargs).double().cpu()  # (B, S)
                for kk in k.unique().tolist():
                    sequence.setdefault(kk, []).append(nll_t[(k == kk).cpu()])
            seen += len(x)
            if self.log_every and i % self.log_every == 0:
                log.info(f"likelihood: {seen} images in {time.perf_counter() - started:.1f} s")
        return self._report(elbo, iwae, sequence, dims)

    def _report(self, elbo: list, iwae: list, sequence: dict, dims: int) -> dict[str, float]:
        # log N(x; x̂, I) carries −D/2·log 2π; drop it on request (a constant shift per image).
        shift = 0.0
        if self.likelihood == "gaussian_unit" and not self.gaussian_constant:
            shift = -0.5 * dims * math.log(2 * math.pi)

        def summary(name: str, values: torch.Tensor) -> dict[str, float]:
            mean = float(values.mean()) + shift
            return {
                name: mean,
                f"{name}/per_dim": mean / dims,
                f"{name}/bits_per_dim": mean / (dims * math.log(2)),
            }

        out: dict[str, float] = {}
        out.update(summary("nll_elbo", torch.cat(elbo)))
        if iwae:
            out.update(summary(f"nll_iwae{self.num_samples}", torch.cat(iwae)))
        per_k = []
        for kk in sorted(sequence):
            values = torch.cat(sequence[kk])  # (n, S)
            out.update(summary(f"nll_seq_k{kk}", values.mean(1)))
            per_k.append(out[f"nll_seq_k{kk}"])
        if per_k:
            out["nll_seq_mean"] = float(np.mean(per_k))
        if self.likelihood == "gaussian_unit":
            out["gaussian_constant_included"] = float(self.gaussian_constant)
        return out
