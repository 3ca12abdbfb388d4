"""k-NN manifold metrics on feature sets: precision and recall (Kynkäänniemi et al., "Improved
Precision and Recall Metric for Assessing Generative Models", NeurIPS 2019) and density and
coverage (Naeem et al., "Reliable Fidelity and Diversity Metrics for Generative Models", ICML
2020).

Each real sample r_i has a ball of radius NND_k(r_i), the distance to its k-th nearest other
real sample (likewise for fake samples). With real set R (N) and fake set F (M):

- precision = (1/M) Σ_j 1[∃ i: ||f_j - r_i|| ≤ NND_k(r_i)]   (fakes inside the real manifold)
- recall    = (1/N) Σ_i 1[∃ j: ||r_i - f_j|| ≤ NND_k(f_j)]   (reals inside the fake manifold)
- density   = 1/(k M) Σ_j Σ_i 1[||f_j - r_i|| < NND_k(r_i)]  (how many real balls hold a fake)
- coverage  = (1/N) Σ_i 1[∃ j: ||f_j - r_i|| < NND_k(r_i)]   (real balls holding any fake)

Inclusive balls for precision/recall, strict ones for density/coverage, as in the two papers'
code. Distances are Euclidean, computed in row blocks so 10k × 10k sets fit in memory.
"""

from __future__ import annotations

import torch

from latentzoo.utils.errors import LatentzooError

BLOCK = 1024  # rows of a distance block


def _blocks(x: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
    return [(start, x[start : start + BLOCK]) for start in range(0, x.shape[0], BLOCK)]


def knn_radii(features: torch.Tensor, k: int) -> torch.Tensor:
    """Distance of each row to its k-th nearest *other* row (the row itself, at 0, excluded)."""
    if features.shape[0] <= k:
        raise LatentzooError(
            f"k-NN radii need more than k={k} samples, got {features.shape[0]}; "
            "use more images or a smaller k"
        )
    radii = []
    for start, block in _blocks(features):
        distances = torch.cdist(block, features)
        rows = torch.arange(block.shape[0], device=features.device)
        distances[rows, rows + start] = float("inf")  # a sample is not its own neighbour
        radii.append(distances.kthvalue(k, dim=1).values)
    return torch.cat(radii)


def _inside(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, strict: bool):
    """Per point: is it inside any ball, and inside how many (``[len(points)]`` each)."""
    any_ball, count = [], []
    for _, block in _blocks(points):
        distances = torch.cdist(block, centres)
        hit = distances < radii[None] if strict else distances <= radii[None]
        any_ball.append(hit.any(dim=1))
        count.append(hit.sum(dim=1))
    return torch.cat(any_ball), torch.cat(count)


@torch.no_grad()
def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3) -> dict[str, float]:
    """Kynkäänniemi et al. 2019 precision and recall of ``fake`` against ``real`` ([N, D])."""
    real, fake = real.double(), fake.double()
    in_real, _ = _inside(fake, real, knn_radii(real, k), strict=False)
    in_fake, _ = _inside(real, fake, knn_radii(fake, k), strict=False)
    return {"precision": float(in_real.double().mean()), "recall": float(in_fake.double().mean())}


@torch.no_grad()
def density_coverage(real: torch.Tensor, fake: torch.Tensor, k: int = 5) -> dict[str, float]:
    """Naeem et al. 2020 density and coverage of ``fake`` against ``real`` ([N, D])."""
    real, fake = real.double(), fake.double()
    radii = knn_radii(real, k)
    _, balls_per_fake = _inside(fake, real, radii, strict=True)
    # coverage: for each real ball, is its nearest fake strictly inside it
    nearest_fake = torch.cat(
        [torch.cdist(block, fake).min(dim=1).values for _, block in _blocks(real)]
    )
    return {
        "density": float(balls_per_fake.double().sum() / (k * fake.shape[0])),
        "coverage": float((nearest_fake < radii).double().mean()),
    }
