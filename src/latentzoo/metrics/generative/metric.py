"""The FID (+ KID) state: one shared feature extractor feeding torchmetrics' accumulators.

Protocol (metrics.md §12): uint8 by rounding, features with TF32 off, float64 statistics. Under
DDP every rank adds its own fake images; the reference FID state lives on rank 0 only, so the
sum-reduction at ``compute`` gives the right totals, and KID all-gathers the fake features and
draws its subsets from one seed, so every rank reports the same numbers. The metric objects live
here, never inside a LightningModule (no Inception in checkpoints).
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import scipy.linalg
import torch
from torch import nn

from latentzoo.metrics.generative.extractors import build_feature_extractor, no_tf32
from latentzoo.metrics.generative.imaging import to_uint8
from latentzoo.metrics.generative.prd import density_coverage, precision_recall
from latentzoo.metrics.generative.progress import dist_info
from latentzoo.metrics.generative.reference import ReferenceStats
from latentzoo.utils.errors import LatentzooError
from latentzoo.utils.logging import RankedLogger

log = RankedLogger(__name__, rank_zero_only=True)


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


class _Features(nn.Module):
    """Identity 'extractor' handed to torchmetrics: we pass it features we computed once."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def _all_ranks(features: torch.Tensor) -> torch.Tensor:
    """This rank's features -> every rank's, concatenated in rank order (uneven counts allowed)."""
    if dist_info()[1] == 1:
        return features
    from torchmetrics.utilities.distributed import gather_all_tensors

    return torch.cat(gather_all_tensors(features.contiguous()))


class GenerativeMetrics:
    """FID (+ KID, + k-NN precision/recall/density/coverage) state: one extractor, torchmetrics
    accumulators, reference statistics (see the module docstring for the DDP reduction).

    KID and the k-NN metrics (``prd``, see :mod:`~latentzoo.metrics.generative.prd`) use the same
    features: a uniform sample of at most ``kid_reference_size`` reference features, and the
    fake features in sample order (the first ``prd_num_samples`` for the k-NN metrics).
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
        kid_seed: int = 0,
        prd: bool = False,
        prd_k: int = 3,
        dc_k: int = 5,
        prd_num_samples: int = 10_000,
    ) -> None:
        from torchmetrics.image.fid import FrechetInceptionDistance
        from torchmetrics.image.kid import KernelInceptionDistance

        self.device = torch.device(device)
        self.extractor = build_feature_extractor(extractor, weights_path).to(self.device).eval()
        d = self.kid_features_dim = int(self.extractor.num_features)
        self.extractor_id = str(
            getattr(self.extractor, "extractor_id", type(self.extractor).__name__)
        )
        self.fid = FrechetInceptionDistance(feature=_Features(d), reset_real_features=False)
        self.fid.to(self.device)
        self.kid = None
        self.kid_subset_size = kid_subset_size
        self.kid_reference_size = kid_reference_size
        if kid:
            warnings.filterwarnings("ignore", "Metric `Kernel Inception Distance` will save all")
            self.kid = KernelInceptionDistance(
                feature=_Features(d),
                subsets=kid_subsets,
                subset_size=kid_subset_size,
                reset_real_features=False,
                sync_on_compute=False,  # we gather the fake features ourselves (compute)
            ).to(self.device)
        self.kid_seed = kid_seed
        self.prd, self.prd_k, self.dc_k, self.prd_num_samples = prd, prd_k, dc_k, prd_num_samples
        self.keeps_features = kid or prd  # a reference feature sample and the fake features
        # KID keeps a uniform random sample (reservoir) of at most kid_reference_size reference
        # features: the first K of an ordered split (ImageNet sorted by class) would be biased
        self._kid_features: torch.Tensor | None = None
        self._kid_seen = 0
        self._kid_rng = torch.Generator().manual_seed(0)
        self._fake_features: list[torch.Tensor] = []
        self._fake_index: list[torch.Tensor | None] = []

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (or [0, 1] float) images -> features on ``device``, TF32 off, eval mode.
        Grey images (MNIST) are repeated to RGB, as Inception expects three channels."""
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        with no_tf32():
            return self.extractor(to_uint8(images).to(self.device)).double()

    def add_real(self, images: torch.Tensor) -> None:
        self.add_real_features(self.features(images))

    def add_real_features(self, feats: torch.Tensor) -> None:
        """Reference features (float64 from :meth:`features`)."""
        self.fid.update(feats, real=True)
        if self.keeps_features:
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

    def add_fake(self, images: torch.Tensor, index: range | None = None) -> None:
        """Add generated images; ``index`` (their global sample indices) lets KID put all ranks'
        features in sample order, so its subsets do not depend on the sharding."""
        self.add_fake_features(self.features(images), index)

    def add_fake_features(self, feats: torch.Tensor, index: range | None = None) -> None:
        """Generated-image features (float64 from :meth:`features`); see :meth:`add_fake`."""
        self.fid.update(feats, real=False)
        if self.keeps_features:
            self._fake_features.append(feats.float())
            self._fake_index.append(None if index is None else torch.as_tensor(index))

    def set_fake(self, stats: ReferenceStats) -> None:
        """Saved statistics as the generated side (single process): mu/sigma for FID, their
        feature sample (if any) for KID and the k-NN metrics."""
        mu = torch.as_tensor(stats.mu, dtype=torch.float64, device=self.device)
        sigma = torch.as_tensor(stats.sigma, dtype=torch.float64, device=self.device)
        n = stats.count
        self.fid.fake_features_sum = mu * n
        self.fid.fake_features_cov_sum = sigma * max(n - 1, 0) + n * torch.outer(mu, mu)
        self.fid.fake_features_num_samples = torch.tensor(n, device=self.device)
        self._fake_features, self._fake_index = [], []
        if self.keeps_features and stats.features is not None:
            self._fake_features = [torch.as_tensor(stats.features).float().to(self.device)]
            self._fake_index = [None]

    def reset_fake(self) -> None:
        self.fid.reset()  # reset_real_features=False keeps the reference
        if self.kid is not None:
            self.kid.reset()
        self._fake_features, self._fake_index = [], []

    def reference(self, meta: dict[str, Any]) -> ReferenceStats:
        """Reference statistics from the real state (summed over ranks)."""
        with self.fid.sync_context(should_sync=dist_info()[1] > 1):
            n = int(self.fid.real_features_num_samples)
            s = self.fid.real_features_sum.double()
            cov = self.fid.real_features_cov_sum.double()
        if n < 2:
            raise LatentzooError("FID reference: fewer than 2 real images")
        mu = s / n
        sigma = (cov - n * torch.outer(mu, mu)) / (n - 1)
        features = None
        if self.keeps_features:
            features = self._kid_sample().cpu().numpy()
        return ReferenceStats(mu.cpu().numpy(), sigma.cpu().numpy(), n, meta, features)

    def _kid_sample(self) -> torch.Tensor:
        """The KID reference sample; under DDP the ranks' reservoirs (uniform samples of equal
        shards) merged and cut to ``kid_reference_size`` by one seed, the same on every rank."""
        empty = torch.empty(0, self.kid_features_dim, device=self.device)
        local = self._kid_features if self._kid_features is not None else empty
        if dist_info()[1] == 1:
            return local
        merged = _all_ranks(local)
        if merged.shape[0] <= self.kid_reference_size:
            return merged
        keep = torch.randperm(merged.shape[0], generator=torch.Generator().manual_seed(0))
        return merged[keep[: self.kid_reference_size].to(merged.device)]

    def set_reference(self, stats: ReferenceStats) -> None:
        """Load cached statistics into the real state (rank 0 only under DDP, see class doc)."""
        mu = torch.as_tensor(stats.mu, dtype=torch.float64, device=self.device)
        sigma = torch.as_tensor(stats.sigma, dtype=torch.float64, device=self.device)
        n = stats.count if dist_info()[0] == 0 else 0
        self.fid.real_features_sum = mu * n
        self.fid.real_features_cov_sum = sigma * max(n - 1, 0) + n * torch.outer(mu, mu)
        self.fid.real_features_num_samples = torch.tensor(n, device=self.device)
        if self.keeps_features:
            self._kid_features, self._kid_seen = None, 0
            if stats.features is not None:
                feats = torch.as_tensor(stats.features[: self.kid_reference_size])
                self._kid_features = feats.float().to(self.device)
                self._kid_seen = feats.shape[0]

    def compute(self) -> dict[str, float]:
        """FID (KID, k-NN metrics) of all ranks' fake images; a collective call under DDP."""
        out = {"fid": float(self.fid.compute())}
        if self.keeps_features:
            fake = self._gathered_fake()
            n_fake = fake.shape[0]
            if self.kid is not None:
                out.update(self._kid(fake))
            if self.prd:
                out.update(self._prd(fake))
        else:
            n_fake = int(self.fid.fake_features_num_samples)
            if dist_info()[1] > 1:
                total = torch.tensor(n_fake, device=self.device)
                torch.distributed.all_reduce(total)
                n_fake = int(total)
        if n_fake < 2048 and self.extractor_id.startswith("inception"):
            log.warning(f"FID from {n_fake} < 2048 samples: rank-deficient covariance, biased high")
        return out

    def _gathered_fake(self) -> torch.Tensor:
        """Every rank's fake features in global sample order (when indices were given)."""
        empty = torch.empty(0, self.kid_features_dim, device=self.device)
        local = self._fake_features
        fake = _all_ranks(torch.cat(local) if local else empty)
        if all(i is not None for i in self._fake_index):  # the same on every rank
            index = torch.cat([torch.empty(0, dtype=torch.long), *self._fake_index])
            fake = fake[_all_ranks(index.to(self.device)).argsort()]
        return fake

    def _reference_sample(self) -> torch.Tensor:
        if self._kid_features is None or len(self._kid_features) == 0:
            raise LatentzooError(
                "KID / precision-recall need reference features, and the reference holds only "
                "mu and sigma; give images (or statistics saved with features) as the reference"
            )
        return self._kid_features

    def _kid(self, fake: torch.Tensor) -> dict[str, float]:
        """KID mean/std over subsets of every rank's fake features against the reference sample;
        the subsets come from ``kid_seed``, so all ranks (and reruns) agree."""
        assert self.kid is not None
        n_fake = fake.shape[0]
        n_ref = 0 if self._kid_features is None else self._kid_features.shape[0]
        if min(n_fake, n_ref) < self.kid_subset_size:
            raise LatentzooError(
                f"KID subset_size {self.kid_subset_size} is larger than the generated "
                f"({n_fake}) or reference ({n_ref}) set; lower metrics.fid.kid_subset_size or "
                "set metrics.fid.kid=false"
            )
        self.kid.fake_features, self.kid.real_features = [fake], [self._kid_features]
        try:
            # the features are set here, not through update(): torchmetrics would warn
            with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
                warnings.filterwarnings("ignore", ".*was called before the ``update`` method")
                torch.manual_seed(self.kid_seed)
                mean, std = self.kid.compute()
        finally:
            self.kid.fake_features, self.kid.real_features = [], []
            self.kid._computed = None
        return {"kid_mean": float(mean), "kid_std": float(std)}

    def _prd(self, fake: torch.Tensor) -> dict[str, float]:
        """Precision/recall (k = ``prd_k``) and density/coverage (k = ``dc_k``) of the first
        ``prd_num_samples`` fake features against the reference sample."""
        real = self._reference_sample()
        fake = fake[: self.prd_num_samples]
        return {
            **precision_recall(real, fake, self.prd_k),
            **density_coverage(real, fake, self.dc_k),
        }
