"""Small-sample FID during training, logged as ``val/fid`` (monitoring only: never compare it
with FID-50k; metrics.md §12)."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import lightning as L
import torch

from latentzoo.callbacks.interrupt import SamplingInterrupted, abort_on_stop, stop_requested
from latentzoo.metrics.generative import GenerativeMetrics, generate_into, reference_stats
from latentzoo.utils.logging import RankedLogger

log = RankedLogger(__name__, rank_zero_only=True)


class FIDCallback(L.Callback):
    """Every ``every_n_steps`` training steps (and at the end of training), sample
    ``num_samples`` images and log their FID as ``val/fid``, against ``reference_path`` (an
    ``.npz`` of mu/sigma, e.g. ADM's reference batch; what training on a latent cache without a
    source-image loader needs) or cached statistics of the datamodule's ``reference_split``.

    Under DDP every rank samples its share, the reference state sits on rank 0, and torchmetrics
    sum-reduces the statistics, so all ranks get the same value. ``<key>_nfe``,
    ``<key>_net_forwards`` and ``<key>_images_per_second`` are logged with it. The extractor is
    built lazily on the module's device and kept out of the LightningModule (no Inception in
    checkpoints).

    Sized to the device: on the CPU the ``on_cpu`` settings cap ``num_samples``, ``batch_size``
    and ``reference_num_images`` and replace ``sampler`` and ``steps``, so a CPU run's FID costs
    minutes (a CPU value is then not comparable with a GPU run's; ``on_cpu: null`` turns this
    off). A stop signal
    aborts the sampling at the next net evaluation; that FID is skipped with one log line.
    """

    ON_CPU = ("num_samples", "batch_size", "sampler", "steps", "reference_num_images")

    def __init__(
        self,
        every_n_steps: int = 5000,
        num_samples: int = 5000,
        batch_size: int = 100,
        sampler: str | None = None,
        steps: int | None = None,
        cfg_scale: float | None = None,
        labels: str = "balanced",
        precision: str = "fp32",
        extractor: str = "inception",
        weights_path: str | None = None,
        reference_split: str = "train",
        reference_num_images: int | None = None,
        reference_batch_size: int = 100,
        reference_path: str | None = None,
        stats_dir: str | None = None,
        seed: int = 0,
        key: str = "val/fid",
        on_cpu: dict[str, Any] | None = None,
    ) -> None:
        self.on_cpu = dict(on_cpu or {})
        unknown = sorted(set(self.on_cpu) - set(self.ON_CPU))
        if unknown:
            raise ValueError(f"FIDCallback on_cpu takes {', '.join(self.ON_CPU)}, not {unknown}")
        self.every_n_steps = every_n_steps
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.sample_kwargs = {"sampler": sampler, "steps": steps, "cfg_scale": cfg_scale}
        self.labels = labels
        self.precision = precision
        self.extractor = extractor
        self.weights_path = weights_path
        self.reference_split = reference_split
        self.reference_num_images = reference_num_images
        self.reference_batch_size = reference_batch_size
        self.reference_path = reference_path
        self.stats_dir = stats_dir
        self.seed = seed
        self.key = key
        self.metrics: GenerativeMetrics | None = None
        self._last_step = -1

    def _size_to_device(self, pl_module: L.LightningModule) -> None:
        """Apply ``on_cpu`` once, on a CPU run (``sampler``/``steps`` only where ``sample`` takes
        them)."""
        if pl_module.device.type != "cpu" or not self.on_cpu:
            return
        accepted = inspect.signature(pl_module.sample).parameters
        for key, value in self.on_cpu.items():
            if key in ("sampler", "steps"):
                if key in accepted:
                    self.sample_kwargs[key] = value
            elif value is not None:  # sizes are caps: a smaller setting stays
                current = getattr(self, key)
                setattr(self, key, value if current is None else min(current, value))
        log.info(f"{self.key} on cpu: {self.on_cpu} (callbacks.fid.on_cpu)")
        self.on_cpu = {}

    def _prepare(self, trainer: L.Trainer, pl_module: L.LightningModule) -> GenerativeMetrics:
        self._size_to_device(pl_module)
        if self.metrics is None:
            self.metrics = GenerativeMetrics(
                extractor=self.extractor,
                weights_path=self.weights_path,
                kid=False,
                device=pl_module.device,
            )
            stats_dir = self.stats_dir or Path(trainer.default_root_dir, "fid_stats")
            stats = reference_stats(
                self.metrics,
                trainer.datamodule,
                split=self.reference_split,
                num_images=self.reference_num_images,
                batch_size=self.reference_batch_size,
                stats_dir=stats_dir,
                path=self.reference_path,
            )
            self.metrics.set_reference(stats)
        return self.metrics

    def _run(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        step = trainer.global_step
        if trainer.sanity_checking or step == self._last_step or stop_requested(trainer):
            return
        self._last_step = step
        result = self._fid(trainer, pl_module)
        if result is None:
            return
        fid, timing = result
        log.info(f"{self.key} at step {step}: {fid:.3f} ({self.num_samples} samples)")
        values = {self.key: fid}
        for name in ("nfe", "net_forwards", "images_per_second"):
            if name in timing:
                values[f"{self.key}_{name}"] = timing[name]
        pl_module.log_dict(values, on_step=True, on_epoch=False, sync_dist=False)

    def _fid(self, trainer: L.Trainer, pl_module: L.LightningModule) -> tuple[float, dict] | None:
        """FID of ``num_samples`` fresh samples against the reference, and the timing dict;
        None when a stop signal interrupted it."""
        try:
            with abort_on_stop(trainer):
                metrics = self._prepare(trainer, pl_module)
                metrics.reset_fake()
                num_classes = int(getattr(trainer.datamodule, "num_classes", 0) or 0)
                timing = generate_into(
                    pl_module,
                    metrics,
                    self.num_samples,
                    self.batch_size,
                    num_classes,
                    self.labels,
                    self.sample_kwargs,
                    self.seed,
                    precision=self.precision,
                )
        except SamplingInterrupted:
            log.warning(f"{self.key} at step {trainer.global_step} skipped: stopping on a signal")
            return None
        return metrics.compute()["fid"], timing  # identical on every rank after the reduction

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps > 0 and step > 0 and step % self.every_n_steps == 0:
            self._run(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        step = trainer.global_step
        if step != self._last_step and not stop_requested(trainer):
            log.info(f"FID at the end of training (step {step})")
            # Lightning forbids self.log in on_train_end; write to the loggers directly
            result = self._fid(trainer, pl_module)
            if result is None:
                return
            fid, _ = result
            self._last_step = step
            if trainer.global_rank == 0:
                for logger in trainer.loggers:
                    logger.log_metrics({self.key: fid}, step=step)
            trainer.callback_metrics[self.key] = torch.tensor(fid)

    def state_dict(self) -> dict[str, Any]:
        return {"last_step": self._last_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._last_step = state_dict.get("last_step", -1)
