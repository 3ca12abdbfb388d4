"""eval.py metric sets: ``metrics=fid`` (:class:`FIDEvaluator`) and ``metrics=nfe``
(:class:`NFEEvaluator`). Both sample with ``generate``: sharded over ranks under DDP, in eval
mode, with the ``precision`` option."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from latentzoo.metrics.generative.generation import generate, generate_into, shard_batches
from latentzoo.metrics.generative.metric import GenerativeMetrics
from latentzoo.metrics.generative.progress import dist_info
from latentzoo.metrics.generative.reference import ReferenceStats, reference_stats
from latentzoo.metrics.generative.writers import SAVE_MODES, sample_writers
from latentzoo.utils.errors import LatentzooError
from latentzoo.utils.logging import RankedLogger

log = RankedLogger(__name__, rank_zero_only=True)


def sampling_tag(sample_kwargs: dict[str, Any], precision: str) -> str:
    """``sampler=dopri5, cfg_scale=1.5, bf16`` for log lines (metrics.md §12: say how)."""
    parts = [f"{k}={v}" for k, v in sample_kwargs.items() if v is not None]
    return ", ".join(parts + ([precision] if precision != "fp32" else []))


class FIDEvaluator:
    """``metrics=fid``: sample ``num_samples`` images and report FID / KID against reference
    statistics: ``reference_path`` (an ``.npz`` of mu/sigma, e.g. ADM's reference batch), else
    the datamodule's ``reference_split``, computed once and cached in ``stats_dir``.

    With ``prd``: ``precision``/``recall`` (Kynkäänniemi et al. 2019, k = ``prd_k``) and
    ``density``/``coverage`` (Naeem et al. 2020, k = ``dc_k``) of the first ``prd_num_samples``
    samples against the reference feature sample (at most ``kid_reference_size``), on the same
    features as FID.

    Returns ``fid``, ``kid_mean``, ``kid_std`` (if ``kid``), ``nfe`` and ``net_forwards`` (mean
    per sample call, when the model reports ``last_nfe`` / ``last_net_forwards``),
    ``sampling_seconds`` and ``images_per_second``. Only the ``sample`` keyword arguments that
    are not None are passed, so VAEs' ``sample(n)`` work too. ``save_samples``: ``png`` (a
    folder), ``npz`` (uint8 NHWC ``arr_0``), ``both`` or null.
    """

    requires = ("sample",)

    def __init__(
        self,
        num_samples: int = 50_000,
        batch_size: int = 100,
        sampler: str | None = None,
        steps: int | None = None,
        cfg_scale: float | None = None,
        labels: str = "balanced",
        precision: str = "fp32",
        extractor: str | nn.Module = "inception",
        weights_path: str | None = None,
        kid: bool = True,
        kid_subsets: int = 100,
        kid_subset_size: int = 1000,
        kid_reference_size: int = 10_000,
        prd: bool = False,
        prd_k: int = 3,
        dc_k: int = 5,
        prd_num_samples: int = 10_000,
        reference_split: str = "train",
        reference_num_images: int | None = None,
        reference_batch_size: int = 100,
        reference_path: str | None = None,
        stats_dir: str | None = None,
        save_samples: str | bool | None = None,
        output_dir: str | None = None,
        seed: int = 0,
    ) -> None:
        self.num_samples = int(num_samples)
        self.batch_size = batch_size
        self.sample_kwargs = {"sampler": sampler, "steps": steps, "cfg_scale": cfg_scale}
        self.labels = labels
        self.precision = precision
        self.metric_kwargs = dict(
            extractor=extractor,
            weights_path=weights_path,
            kid=kid,
            kid_subsets=kid_subsets,
            kid_subset_size=kid_subset_size,
            kid_reference_size=kid_reference_size,
            prd=prd,
            prd_k=prd_k,
            dc_k=dc_k,
            prd_num_samples=prd_num_samples,
        )
        self.reference_split = reference_split
        self.reference_num_images = reference_num_images
        self.reference_batch_size = reference_batch_size
        self.reference_path = reference_path
        self.stats_dir = stats_dir
        if save_samples is True:
            save_samples = "both"
        if (save_samples or None) not in SAVE_MODES:
            raise LatentzooError(
                f"save_samples must be png, npz, both or null, not {save_samples!r}"
            )
        self.save_samples = save_samples or None
        self.output_dir = Path(output_dir) if output_dir else Path.cwd()
        self.seed = seed

    def __call__(self, model: nn.Module, datamodule: Any) -> dict[str, float]:
        device = next(model.parameters()).device
        metrics = GenerativeMetrics(device=device, **self.metric_kwargs)
        stats = reference_stats(
            metrics,
            datamodule,
            split=self.reference_split,
            num_images=self.reference_num_images,
            batch_size=self.reference_batch_size,
            stats_dir=self.stats_dir or Path(self.output_dir, "fid_stats"),
            path=self.reference_path,
        )
        use_reference(metrics, stats)
        metrics.reset_fake()
        rank, world = dist_info()
        own = sum(map(len, shard_batches(self.num_samples, self.batch_size, rank, world)))
        writers = sample_writers(
            self.save_samples,
            self.output_dir,
            tuple(getattr(datamodule, "image_shape", ())),
            own,
            rank,
            world,
        )
        values = generate_into(
            model,
            metrics,
            self.num_samples,
            self.batch_size,
            int(getattr(datamodule, "num_classes", 0) or 0),
            self.labels,
            self.sample_kwargs,
            self.seed,
            writers,
            self.precision,
        )
        values = {**metrics.compute(), **values}
        n = self.num_samples
        size = f"{n // 1000}k" if n >= 1000 and n % 1000 == 0 else str(n)
        tag = sampling_tag(self.sample_kwargs, self.precision)
        source = stats.meta.get("dataset", stats.meta.get("source", "?"))
        log.info(
            f"FID-{size} {metrics.extractor_id} vs {source}/{self.reference_split} "
            f"({stats.count} images){', ' + tag if tag else ''}: fid={values['fid']:.3f}"
            + "".join(
                f", {k}={values[k]:.3f}"
                for k in ("precision", "recall", "density", "coverage")
                if k in values
            )
            + "".join(f", {k}={values[k]:.1f}" for k in ("nfe", "net_forwards") if k in values)
            + f", {values['images_per_second']:.1f} images/s"
        )
        return values


def use_reference(metrics: GenerativeMetrics, stats: ReferenceStats) -> None:
    """Load ``stats`` into ``metrics``; KID is dropped (with a warning) when they carry no
    feature sample, as a foreign mu/sigma file without images; the k-NN metrics (``prd``) then
    stop with what to do."""
    no_features = stats.features is None or len(stats.features) == 0
    if metrics.prd and no_features:
        raise LatentzooError(
            "metrics.fid.prd needs reference features; the reference holds only mu and sigma "
            "(a foreign file?): use the data's reference split or an .npz with arr_0 images"
        )
    if metrics.kid is not None and no_features:
        log.warning("KID skipped: the FID reference holds only mu and sigma (no features)")
        metrics.kid = None
    metrics.set_reference(stats)


class NFEEvaluator:
    """``metrics=nfe``: mean NFE of ``model.sample`` at batch 1 over ``num_samples`` samples.

    Adaptive solvers' NFE depends on the batch (their error norm spans the whole tensor), so the
    comparable number is the batch-1 mean, as LFM's ``--compute_nfe``. Reports ``nfe``,
    ``net_forwards`` (2·NFE with CFG: a guided call is one doubled-batch forward),
    ``sampling_seconds`` and ``images_per_second`` at batch 1 (including the decode).
    """

    requires = ("sample",)

    def __init__(
        self,
        num_samples: int = 300,
        sampler: str | None = None,
        steps: int | None = None,
        cfg_scale: float | None = None,
        labels: str = "balanced",
        precision: str = "fp32",
        seed: int = 0,
    ) -> None:
        self.num_samples = int(num_samples)
        self.sample_kwargs = {"sampler": sampler, "steps": steps, "cfg_scale": cfg_scale}
        self.labels, self.precision, self.seed = labels, precision, seed

    def __call__(self, model: nn.Module, datamodule: Any) -> dict[str, float]:
        values = generate(
            model,
            lambda images, chunk: None,
            self.num_samples,
            1,
            int(getattr(datamodule, "num_classes", 0) or 0),
            self.labels,
            self.sample_kwargs,
            self.seed,
            self.precision,
        )
        if "nfe" not in values:
            raise LatentzooError(
                f"metrics=nfe: {type(model).__name__}.sample() reports no last_nfe (only ODE "
                "samplers count function evaluations)"
            )
        tag = sampling_tag(self.sample_kwargs, self.precision)
        log.info(
            f"NFE at batch 1 over {self.num_samples} samples{', ' + tag if tag else ''}: "
            f"nfe={values['nfe']:.2f}"
            + (f", net_forwards={values['net_forwards']:.2f}" if "net_forwards" in values else "")
        )
        return values
