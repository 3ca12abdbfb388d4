"""Equivariance error and approximate likelihood on in-test sequence data."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from latentzoo.metrics.equivariance import EquivarianceError, matched_accuracy
from latentzoo.metrics.likelihood import ApproximateLikelihood
from tests.models.test_latent_flow import SequenceData, tiny_flow


class OracleModel(nn.Module):
    """A 'model' whose decoded path is the true sequence (looked up by x_0) plus ``offset``."""

    def __init__(self, data: SequenceData, offset: float = 0.0, weak: bool = False) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))
        self.num_transforms = data.num_transforms
        self.variant = "weak" if weak else "supervised"
        self.offset = offset
        self.table = [(b["frames"], b["k"]) for b in data.batches]
        self.permutation = torch.tensor([1, 0])  # R's labels are the true ones swapped

    def _lookup(self, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The stored sequences (and k) whose first frames are the rows of ``x0``."""
        frames = torch.cat([f for f, _ in self.table])
        ks = torch.cat([k for _, k in self.table])
        match = (x0[:, None] == frames[None, :, 0]).flatten(2).all(2).float().argmax(1)
        return frames[match], ks[match]

    def encode(self, x):
        return x.flatten(1)

    def decode(self, z):
        return z

    def predict_transform(self, frames):
        return self.permutation[self._lookup(frames[:, 0])[1]]

    def transform(self, x, k, steps):
        frames, true_k = self._lookup(x)
        expected = true_k if self.variant == "supervised" else self.permutation[true_k]
        wrong = (torch.as_tensor(k) != expected).float()[None, :, None, None, None]
        path = frames.transpose(0, 1)[: steps + 1] + self.offset
        return path + wrong  # a wrong flow index costs 1 per pixel


def test_equivariance_error_is_zero_for_the_exact_path_and_grows_with_an_offset() -> None:
    data = SequenceData(num_k=2, steps=3, batch=4)
    exact = EquivarianceError()(OracleModel(data), data)
    assert exact["E_k0"] == 0 and exact["E_k1"] == 0 and exact["E_mean"] == 0
    shifted = EquivarianceError()(OracleModel(data, offset=0.1), data)
    pixels = 28 * 28
    assert shifted["E_k0"] == pytest.approx(0.1 * 3 * pixels, rel=1e-5)  # Σ_t Σ_chw |0.1|
    assert shifted["E_k1/per_pixel"] == pytest.approx(0.1, rel=1e-5)
    assert shifted["E_k0/t2"] == pytest.approx(0.1 * pixels, rel=1e-5)
    assert shifted["E_mean"] == pytest.approx(0.1 * 3 * pixels, rel=1e-5)
    capped = EquivarianceError(max_per_k=3)(OracleModel(data, offset=0.1), data)
    assert capped["E_k0"] == pytest.approx(shifted["E_k0"], rel=1e-5)


def test_weak_equivariance_uses_r_and_reports_oracle_and_matched_accuracy() -> None:
    data = SequenceData(num_k=2, steps=3, batch=4)
    scores = EquivarianceError()(OracleModel(data, weak=True), data)
    assert scores["index_accuracy"] == 1.0  # R's swapped labels are matched back
    assert scores["E_mean"] == 0 and scores["oracle/E_mean"] == 0


def test_matched_accuracy_relabels_by_the_hungarian_algorithm() -> None:
    confusion = np.array([[0, 9, 1], [8, 0, 2], [0, 0, 10]])
    accuracy, mapping = matched_accuracy(confusion)
    assert mapping.tolist() == [1, 0, 2]
    assert accuracy == pytest.approx(27 / 30)


def test_equivariance_of_a_zero_potential_is_the_reconstruction_error() -> None:
    torch.manual_seed(0)
    data = SequenceData(num_k=2, steps=3, batch=4)
    model = tiny_flow().eval()

    class Zero(nn.Module):
        def forward(self, z, tau):
            return 0 * z.sum(1) + 0 * tau

    model.potentials = nn.ModuleList([Zero(), Zero()])
    scores = EquivarianceError()(model, data)
    for k in (0, 1):
        sequences = torch.cat([b["frames"] for b in data.batches if int(b["k"][0]) == k])
        recon = model.reconstruct(sequences[:, 0])
        expected = (recon[:, None] - sequences[:, 1:]).abs().flatten(2).sum(2).sum(1).mean()
        assert scores[f"E_k{k}"] == pytest.approx(float(expected), rel=1e-4)
        assert scores[f"E_k{k}"] > 0


def test_equivariance_of_a_trained_model_is_finite_and_seeded() -> None:
    torch.manual_seed(0)
    data = SequenceData(num_k=2, steps=3, batch=4)
    model = tiny_flow("weak")
    first = EquivarianceError(seed=3)(model, data)
    second = EquivarianceError(seed=3)(model, data)
    assert first == second
    assert all(math.isfinite(v) for v in first.values())
    assert 0 <= first["index_accuracy"] <= 1 and "oracle/E_k1" in first


def test_likelihood_metric_has_the_correct_sign_and_units() -> None:
    torch.manual_seed(0)
    data = SequenceData(num_k=2, steps=3, batch=4)
    model = tiny_flow()
    scores = ApproximateLikelihood(num_samples=8)(model, data)
    assert scores["nll_elbo"] > 0 and math.isfinite(scores["nll_elbo"])
    assert scores["nll_iwae8"] <= scores["nll_elbo"] + 1.0  # IWAE is the tighter bound
    assert scores["nll_elbo/per_dim"] == pytest.approx(scores["nll_elbo"] / 784)
    assert scores["nll_elbo/bits_per_dim"] == pytest.approx(
        scores["nll_elbo"] / (784 * math.log(2))
    )
    assert math.isfinite(scores["nll_seq_k0"]) and math.isfinite(scores["nll_seq_mean"])
    gaussian = ApproximateLikelihood(num_samples=1, likelihood="gaussian_unit")(model, data)
    without = ApproximateLikelihood(
        num_samples=1, likelihood="gaussian_unit", gaussian_constant=False
    )(model, data)
    assert gaussian["gaussian_constant_included"] == 1.0
    assert gaussian["nll_elbo"] - without["nll_elbo"] == pytest.approx(
        0.5 * 784 * math.log(2 * math.pi), rel=1e-6
    )
