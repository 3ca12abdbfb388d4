"""FID reference statistics from every batch layout (tensors, tuples, image dicts; a latent
cache's dicts are refused) and from foreign ``.npz`` files (ADM's mu/sigma, arr_0 images)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from latentzoo.data.datasets.proc_blobs import ProcBlobs
from latentzoo.metrics.generative import (
    FIDEvaluator,
    GenerativeMetrics,
    ReferenceStats,
    TinyFeatureExtractor,
    frechet_distance,
    reference_stats,
    to_uint8,
)
from latentzoo.utils.errors import LatentzooError


def _images(n: int, seed: int, size: int = 16) -> torch.Tensor:
    return ProcBlobs(length=n, image_size=size, seed=seed).get_batch(range(n))[0]


def _tiny_stats(images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    features = TinyFeatureExtractor()(to_uint8(images)).double().numpy()
    return features.mean(0), np.cov(features, rowvar=False)


class ListData:
    """A datamodule whose reference loader yields ``batches`` as given (any layout)."""

    def __init__(self, batches: list, name: str = "listdata") -> None:
        self.batches, self.name = batches, name
        self.image_shape = [3, 16, 16]

    def reference_info(self, split: str) -> dict:
        return {"dataset": self.name, "split": split, "image_shape": self.image_shape}

    def reference_dataloader(self, split, batch_size=100, rank=0, world_size=1) -> list:
        return self.batches


REAL = _images(64, seed=0)
LABELS = torch.zeros(64, dtype=torch.long)
LAYOUTS = {
    "tensor": [REAL[:32], REAL[32:]],
    "tuple": [(REAL[:32], LABELS[:32]), (REAL[32:], LABELS[32:])],
    "dict_image": [{"image": REAL[:32], "label": LABELS[:32]}, {"image": REAL[32:]}],
    "dict_images": [{"images": REAL[:40]}, {"images": REAL[40:], "label": LABELS[40:]}],
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_every_batch_layout_gives_the_statistics_of_the_images(layout: str, tmp_path) -> None:
    metrics = GenerativeMetrics(extractor="tiny", kid=False)
    stats = reference_stats(metrics, ListData(LAYOUTS[layout], layout), stats_dir=tmp_path)
    mu, sigma = _tiny_stats(REAL)
    assert stats.count == 64
    np.testing.assert_allclose(stats.mu, mu, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(stats.sigma, sigma, rtol=1e-6, atol=1e-9)


def test_latent_batches_are_refused_with_what_to_do(tmp_path: Path) -> None:
    latents = [{"latent": torch.randn(8, 4, 4, 4), "label": LABELS[:8]}]
    with pytest.raises(LatentzooError, match=r"latent.*reference_path"):
        reference_stats(
            GenerativeMetrics(extractor="tiny", kid=False),
            ListData(latents),
            "train",
            stats_dir=tmp_path,
        )


class FixedSampler(nn.Module):
    """Samples images 0, 1, 2, ... of a fixed ProcBlobs stream, in order."""

    def __init__(self, seed: int = 5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(()))
        self.data = ProcBlobs(length=1000, image_size=16, seed=seed)
        self.cursor = 0

    def sample(self, n: int) -> torch.Tensor:
        images = self.data.get_batch(range(self.cursor, self.cursor + n))[0]
        self.cursor += n
        return images


def _evaluate(tmp_path: Path, data, **kwargs) -> dict[str, float]:
    evaluator = FIDEvaluator(
        num_samples=96,
        batch_size=32,
        extractor="tiny",
        kid=False,
        stats_dir=str(tmp_path / "stats"),
        output_dir=str(tmp_path / "run"),
        **kwargs,
    )
    return evaluator(FixedSampler(), data)


def test_reference_path_of_mu_sigma_is_used_as_given(tmp_path: Path) -> None:
    """An ADM-style file (mu, sigma only): the generated set against its own statistics scores
    ~0, and a file holding a dataset's statistics scores what the computed reference scores."""
    own = tmp_path / "own.npz"
    mu, sigma = _tiny_stats(FixedSampler().data.get_batch(range(96))[0])
    np.savez(own, mu=mu, sigma=sigma)
    latents = ListData([{"latent": torch.randn(8, 4, 4, 4)}])  # never read: the file wins
    assert abs(_evaluate(tmp_path, latents, reference_path=str(own))["fid"]) < 1e-6

    data = ListData([REAL])
    computed = _evaluate(tmp_path, data)["fid"]
    stats = ReferenceStats.load(next((tmp_path / "stats").glob("*.npz")))
    adm = tmp_path / "adm.npz"
    np.savez(adm, mu=stats.mu.astype(np.float32), sigma=stats.sigma)
    from_file = _evaluate(tmp_path, latents, reference_path=str(adm))["fid"]
    assert computed > 0.05 and from_file == pytest.approx(computed, rel=1e-6)
    expected = frechet_distance(
        *_tiny_stats(REAL), *_tiny_stats(FixedSampler().data.get_batch(range(96))[0])
    )
    assert computed == pytest.approx(expected, rel=1e-6)


def test_reference_path_of_arr0_images_and_adm_kid_sample(tmp_path: Path) -> None:
    """A file of uint8 NHWC images in arr_0 gives their statistics; with mu/sigma beside them
    (an ADM reference batch) FID uses mu/sigma and KID the images' features."""
    images = tmp_path / "images.npz"
    np.savez(images, arr_0=to_uint8(REAL).permute(0, 2, 3, 1).numpy())
    metrics = GenerativeMetrics(extractor="tiny", kid=False)
    stats = reference_stats(metrics, None, path=images, batch_size=24)
    assert stats.count == 64
    np.testing.assert_allclose(stats.mu, _tiny_stats(REAL)[0], rtol=1e-5, atol=1e-7)

    adm = tmp_path / "adm_ref.npz"
    fake_mu, fake_sigma = np.zeros(16), np.eye(16)
    np.savez(adm, arr_0=to_uint8(REAL).permute(0, 2, 3, 1).numpy(), mu=fake_mu, sigma=fake_sigma)
    with_kid = GenerativeMetrics(extractor="tiny", kid_subset_size=32, kid_reference_size=100)
    stats = reference_stats(with_kid, None, path=adm, batch_size=24)
    np.testing.assert_array_equal(stats.mu, fake_mu)
    features = TinyFeatureExtractor()(to_uint8(REAL)).numpy()
    np.testing.assert_allclose(stats.features, features, rtol=1e-5, atol=1e-6)
    out = _evaluate(tmp_path, None, reference_path=str(adm))  # kid=False here
    assert out["fid"] > 0
    kid_run = FIDEvaluator(
        num_samples=64,
        batch_size=32,
        extractor="tiny",
        kid_subsets=5,
        kid_subset_size=32,
        reference_path=str(adm),
        output_dir=str(tmp_path / "kid"),
    )(FixedSampler(), None)
    assert {"kid_mean", "kid_std"} <= set(kid_run)
    only_stats = tmp_path / "only_stats.npz"
    np.savez(only_stats, mu=fake_mu, sigma=fake_sigma)
    no_kid = FIDEvaluator(
        num_samples=64,
        batch_size=32,
        extractor="tiny",
        kid_subset_size=32,
        reference_path=str(only_stats),
        output_dir=str(tmp_path / "nokid"),
    )(FixedSampler(), None)
    assert "kid_mean" not in no_kid and no_kid["fid"] > 0  # KID skipped with a warning


def test_foreign_file_without_statistics_or_images_is_refused(tmp_path: Path) -> None:
    np.savez(tmp_path / "bad.npz", features=np.zeros((3, 16)))
    with pytest.raises(LatentzooError, match="expected mu and sigma"):
        reference_stats(
            GenerativeMetrics(extractor="tiny", kid=False), None, path=tmp_path / "bad.npz"
        )
