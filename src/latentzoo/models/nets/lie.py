"""Lie-algebra building blocks of the Commutative Lie Group VAE (Zhu, Xu, Tao, ICML 2021).

A latent code z is read as coordinates in a Lie algebra: each latent z_j owns a learned matrix
A_j, and the group element is g(z) = expm(Σ_j z_j A_j). Latents are split into independent
subgroups (block-diagonal algebras): subgroup k has ``subspace_sizes[k]`` latents and m_k × m_k
matrices with m_k² = ``subgroup_sizes[k]``. The flattened group elements, concatenated over
subgroups, are the "group features" of width G = Σ m_k² that the image decoder reads.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn


def check_subgroups(
    subgroup_sizes: Sequence[int], subspace_sizes: Sequence[int], latent_dim: int | None = None
) -> list[int]:
    """Validate the subgroup configuration; returns the matrix sides m_k."""
    if len(subgroup_sizes) != len(subspace_sizes) or not subgroup_sizes:
        raise ValueError(
            f"subgroup_sizes {list(subgroup_sizes)} and subspace_sizes {list(subspace_sizes)} "
            "must be non-empty lists of the same length (one entry per subgroup)"
        )
    sides = [math.isqrt(int(s)) for s in subgroup_sizes]
    for size, side in zip(subgroup_sizes, sides, strict=True):
        if side < 1 or side * side != size:
            raise ValueError(
                f"each subgroup size is m*m for an m x m matrix; {size} in subgroup_sizes "
                f"{list(subgroup_sizes)} is not a perfect square"
            )
    if any(n < 1 for n in subspace_sizes):
        raise ValueError(f"subspace_sizes must be positive, got {list(subspace_sizes)}")
    if latent_dim is not None and sum(subspace_sizes) != latent_dim:
        raise ValueError(
            f"subspace_sizes {list(subspace_sizes)} sum to {sum(subspace_sizes)}, "
            f"but latent_dim is {latent_dim}"
        )
    return sides


class LieAlgebra(nn.Module):
    """Per-subgroup bases {A_j}, the map z -> flatten(expm(Σ z_j A_j)), and the penalties that
    push the one-parameter subgroups towards acting independently.

    Basis ``k`` has shape (n_k, m_k, m_k), initialised N(0, ``init_scale``²).
    """

    def __init__(
        self,
        subgroup_sizes: Sequence[int],
        subspace_sizes: Sequence[int],
        init_scale: float = 0.001,
    ) -> None:
        super().__init__()
        self.sides = check_subgroups(subgroup_sizes, subspace_sizes)
        self.subspace_sizes = [int(n) for n in subspace_sizes]
        self.group_dim = int(sum(subgroup_sizes))
        self.bases = nn.ParameterList(
            nn.Parameter(torch.randn(n, m, m) * init_scale)
            for n, m in zip(self.subspace_sizes, self.sides, strict=True)
        )

    def algebra(self, z: torch.Tensor) -> list[torch.Tensor]:
        """Σ_j z_j A_j per subgroup: a list of (B, m_k, m_k)."""
        chunks = z.split(self.subspace_sizes, dim=1)
        pairs = zip(chunks, self.bases, strict=True)
        return [torch.einsum("bn,nij->bij", c, basis) for c, basis in pairs]

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """(B, L) latents -> (B, G) flattened group elements."""
        # expm in float32: it is unstable in half precision (and not implemented for bf16 on
        # every backend), so leave autocast for this block.
        with torch.autocast(z.device.type, enabled=False):
            mats = [torch.linalg.matrix_exp(a) for a in self.algebra(z.float())]
        return torch.cat([m.flatten(1) for m in mats], dim=1)

    def hessian_penalty(self) -> torch.Tensor:
        """Σ_k (1/n_k²) Σ_{i≠j} ‖A_i A_j‖_F² over subgroups with n_k > 1 (ordered pairs).

        ∂²g/∂z_i∂z_j at z = 0 is (A_i A_j + A_j A_i)/2, so driving every product to zero is a
        Hessian penalty (and implies commutation). The divisor n_k² keeps the published weights
        (λ_hes = 40 / 20) meaning what they meant in the original code.
        """
        total = self.bases[0].new_zeros(())
        for basis in self.bases:
            n = basis.shape[0]
            if n < 2:
                continue
            products = torch.einsum("aij,bjk->abik", basis, basis)  # A_a A_b
            norms = products.pow(2).sum((-2, -1))
            off_diagonal = norms.sum() - norms.diagonal().sum()
            total = total + off_diagonal / n**2
        return total

    def commutator_penalty(self) -> torch.Tensor:
        """Σ_k (2/(n_k(n_k−1))) Σ_{i<j} ‖A_i A_j − A_j A_i‖_F²: the mean squared commutator.

        The original code penalised A_j A_i − (A_j A_i)ᵀ (antisymmetry), not the commutator.
        """
        total = self.bases[0].new_zeros(())
        for basis in self.bases:
            n = basis.shape[0]
            if n < 2:
                continue
            products = torch.einsum("aij,bjk->abik", basis, basis)
            commutators = products - products.transpose(0, 1)  # [A_a, A_b]
            # the sum over ordered pairs counts each unordered pair twice (diagonal is zero)
            pairs = commutators.pow(2).sum((-2, -1)).sum() / 2
            total = total + pairs * 2 / (n * (n - 1))
        return total


class GroupEncoder(nn.Module):
    """Image -> (posterior mean, log-variance, group features g_E).

    ``trunk`` maps an image to G group features (the conv trunk of the disentanglement
    literature with a G-wide output). Per subgroup k, the slice of g_E of width m_k² feeds two
    separate MLPs (m_k² -> 4 m_k² -> n_k) for the mean and for the log-variance.
    """

    def __init__(
        self, trunk: nn.Module, subgroup_sizes: Sequence[int], subspace_sizes: Sequence[int]
    ) -> None:
        super().__init__()
        check_subgroups(subgroup_sizes, subspace_sizes)
        self.trunk = trunk
        self.subgroup_sizes = [int(s) for s in subgroup_sizes]

        def head(width: int, n: int) -> nn.Module:
            return nn.Sequential(nn.Linear(width, 4 * width), nn.ReLU(), nn.Linear(4 * width, n))

        pairs = list(zip(self.subgroup_sizes, subspace_sizes, strict=True))
        self.mean_heads = nn.ModuleList(head(w, n) for w, n in pairs)
        self.logvar_heads = nn.ModuleList(head(w, n) for w, n in pairs)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        features = self.trunk(x)
        slices = features.split(self.subgroup_sizes, dim=1)
        mean = torch.cat([h(s) for h, s in zip(self.mean_heads, slices, strict=True)], dim=1)
        logvar = torch.cat([h(s) for h, s in zip(self.logvar_heads, slices, strict=True)], dim=1)
        return mean, logvar, features


def xavier_init_(module: nn.Module) -> None:
    """Xavier-uniform weights on every conv / linear layer (the original's initialisation)."""
    for layer in module.modules():
        if isinstance(layer, nn.Conv2d | nn.ConvTranspose2d | nn.Linear):
            nn.init.xavier_uniform_(layer.weight)
