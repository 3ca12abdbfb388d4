"""k-NN precision/recall (Kynkäänniemi et al. 2019) and density/coverage (Naeem et al. 2020):
values worked out by hand on points of a line, and a brute-force check on random sets."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from latentzoo.metrics.generative import prd
from latentzoo.metrics.generative.prd import density_coverage, knn_radii, precision_recall
from latentzoo.utils.errors import LatentzooError


def _line(*xs: float) -> torch.Tensor:
    return torch.tensor([[x, 0.0] for x in xs], dtype=torch.float64)


def test_hand_computed_k2() -> None:
    real, fake = _line(0, 1, 2, 3, 10), _line(0.5, 1.2, 2.5, 5)
    # 2nd-nearest-neighbour radii: real 2, 1, 1, 2, 8; fake 2, 1.3, 2, 3.8
    np.testing.assert_allclose(knn_radii(real, 2), [2, 1, 1, 2, 8])
    np.testing.assert_allclose(knn_radii(fake, 2), [2, 1.3, 2, 3.8])
    pr = precision_recall(real, fake, k=2)
    # every fake lies in a real ball; the real 10 is 5 > 3.8 from the fake 5, so outside all
    assert pr == {"precision": 1.0, "recall": pytest.approx(4 / 5)}
    dc = density_coverage(real, fake, k=2)
    # real balls holding each fake (strict): 0.5 -> {0, 1}; 1.2 -> {0, 1, 2, 3}; 2.5 -> {2, 3,
    # 10}; 5 -> {10} (at distance 2 from the real 3, on its ball's edge: not inside)
    assert dc["density"] == pytest.approx((2 + 4 + 3 + 1) / (2 * 4))
    assert dc["coverage"] == 1.0


def test_hand_computed_k1_ball_edges() -> None:
    real, fake = _line(0, 1), _line(2, 5)
    # real radii 1, 1; fake radii 3, 3. The fake 2 sits on the edge of the real 1's ball:
    # inside for precision (inclusive, Kynkäänniemi), outside for density/coverage (strict, Naeem)
    assert precision_recall(real, fake, k=1) == {"precision": 0.5, "recall": 1.0}
    assert density_coverage(real, fake, k=1) == {"density": 0.0, "coverage": 0.0}


def _brute_force(real: np.ndarray, fake: np.ndarray, k: int, dc_k: int) -> dict[str, float]:
    """The four definitions written as loops over pairs."""

    def radius(points: np.ndarray, i: int, k: int) -> float:
        return sorted(math.dist(points[i], q) for j, q in enumerate(points) if j != i)[k - 1]

    r_pr = [radius(real, i, k) for i in range(len(real))]
    f_pr = [radius(fake, j, k) for j in range(len(fake))]
    r_dc = [radius(real, i, dc_k) for i in range(len(real))]
    pairs = list(itertools.product(range(len(real)), range(len(fake))))
    d = {(i, j): math.dist(real[i], fake[j]) for i, j in pairs}
    precision = np.mean(
        [any(d[i, j] <= r_pr[i] for i in range(len(real))) for j in range(len(fake))]
    )
    recall = np.mean([any(d[i, j] <= f_pr[j] for j in range(len(fake))) for i in range(len(real))])
    density = sum(d[i, j] < r_dc[i] for i, j in pairs) / (dc_k * len(fake))
    coverage = np.mean([any(d[i, j] < r_dc[i] for j in range(len(fake))) for i in range(len(real))])
    return {"precision": precision, "recall": recall, "density": density, "coverage": coverage}


def test_random_sets_match_brute_force_across_blocks(monkeypatch) -> None:
    monkeypatch.setattr(prd, "BLOCK", 7)  # several row blocks, one partial
    generator = torch.Generator().manual_seed(0)
    real = torch.randn(30, 4, generator=generator, dtype=torch.float64)
    fake = torch.randn(23, 4, generator=generator, dtype=torch.float64) * 1.3 + 0.4
    got = {**precision_recall(real, fake, k=3), **density_coverage(real, fake, k=5)}
    expected = _brute_force(real.numpy(), fake.numpy(), 3, 5)
    assert got == pytest.approx(expected, abs=1e-12)
    assert 0 < got["precision"] < 1 and 0 < got["recall"] < 1 and 0 < got["coverage"] < 1


def test_too_few_samples_for_k() -> None:
    with pytest.raises(LatentzooError, match="more than k=3 samples"):
        knn_radii(_line(0, 1, 2), 3)
