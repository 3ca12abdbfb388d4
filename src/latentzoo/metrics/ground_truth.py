"""The disentanglement suite as an eval.py metric set and as a periodic training callback."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import lightning as L
import numpy as np
import torch

from latentzoo.metrics.capabilities import require_capabilities
from latentzoo.utils.errors import LatentzooError
from latentzoo.utils.logging import RankedLogger

log = RankedLogger(__name__)


def factor_dataset_of(datamodule: Any) -> Any:
    """The ground-truth factor dataset behind a datamodule, or a clear error."""
    dataset = getattr(datamodule, "dataset", None)
    if not all(hasattr(dataset, a) for a in ("factor_sizes", "sample_factors", "images_of")):
        raise LatentzooError(
            f"disentanglement metrics need a dataset with ground-truth factors; "
            f"{type(datamodule).__name__} has none; evaluate on one that does, e.g. "
            "data=dsprites, data=shapes3d or data=proc_dsprites."
        )
    return dataset


def model_encoder(model: torch.nn.Module) -> Callable[[torch.Tensor], np.ndarray]:
    """``encode`` on the model's device in eval mode, returning numpy codes."""
    device = next(model.parameters()).device

    @torch.no_grad()
    def encode(images: torch.Tensor) -> np.ndarray:
        return model.encode(images.to(device)).float().cpu().numpy()

    return encode


class DisentanglementMetrics:
    """``metrics=disentanglement`` in eval.py: the disentanglement_lib suite on the datamodule's
    factor dataset, with the sample sizes of ``preset`` (``default`` = dlib, ``fast``, ``clg``)."""

    requires = ("encode",)

    def __init__(
        self,
        preset: str = "default",
        seed: int = 0,
        metrics: Sequence[str] | None = None,
        factor_indices: Sequence[int] | None = None,
        overrides: Mapping[str, Mapping[str, Any]] | None = None,
        encode_batch_size: int = 2048,
    ) -> None:
        from latentzoo.metrics.disentanglement import METRICS

        self.preset = preset
        self.seed = seed
        self.metrics = tuple(metrics) if metrics else METRICS
        self.factor_indices = factor_indices
        self.overrides = overrides
        self.encode_batch_size = encode_batch_size

    def record(self) -> dict[str, Any]:
        """The protocol of the scores (preset, sample sizes, metric seed, metrics, factors):
        eval.py writes it to ``metrics.json`` next to them."""
        from latentzoo.metrics.disentanglement import preset_record

        settings = preset_record(self.preset, self.seed, self.overrides)
        settings["settings"] = {m: settings["settings"][m] for m in self.metrics}
        factors = None if self.factor_indices is None else list(self.factor_indices)
        return {**settings, "metrics": list(self.metrics), "factor_indices": factors}

    def __call__(self, model: torch.nn.Module, datamodule: Any) -> dict[str, float]:
        from latentzoo.metrics.disentanglement import evaluate_all

        require_capabilities(model, self.requires, "disentanglement")
        dataset = factor_dataset_of(datamodule)
        was_training = model.training
        model.eval()
        scores: dict[str, float] = {}
        try:
            # One metric at a time so long runs report progress; every metric restarts its RNG
            # from `seed` (as dlib does), so the values equal those of one joint call.
            for position, name in enumerate(self.metrics, start=1):
                started = time.perf_counter()
                scores.update(
                    evaluate_all(
                        model_encoder(model),
                        dataset,
                        preset=self.preset,
                        seed=self.seed,
                        metrics=[name],
                        factor_indices=self.factor_indices,
                        overrides=self.overrides,
                        encode_batch_size=self.encode_batch_size,
                    )
                )
                elapsed = time.perf_counter() - started
                log.info(f"[{position}/{len(self.metrics)}] {name} done in {elapsed:.1f} s")
            return scores
        finally:
            model.train(was_training)


class DisentanglementCallback(L.Callback):
    """Computes a (fast) disentanglement preset every ``every_n_steps`` training steps and at the
    end of training, and logs it as ``disentanglement/<metric>/<score>``."""

    def __init__(self, every_n_steps: int = 1000, **metric_kwargs: Any) -> None:
        metric_kwargs.setdefault("preset", "fast")
        self.every_n_steps = every_n_steps
        self.evaluate = DisentanglementMetrics(**metric_kwargs)

    def _run(self, trainer: L.Trainer, model: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.global_rank != 0:
            return
        scores = self.evaluate(model, trainer.datamodule)
        log.info(
            f"disentanglement at step {trainer.global_step}: "
            + ", ".join(f"{k}={v:.3f}" for k, v in sorted(scores.items()))
        )
        for logger in trainer.loggers:
            logger.log_metrics(
                {f"disentanglement/{k}": v for k, v in scores.items()}, step=trainer.global_step
            )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps > 0 and step > 0 and step % self.every_n_steps == 0:
            self._run(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._run(trainer, pl_module)
