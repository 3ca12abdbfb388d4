"""Time-dependent scalar potentials u(z, t) for latent flows (Song et al., NeurIPS 2023).

The flow of transformation k is the gradient field dz/dt = ∇_z u_k(z, t). The network follows the
paper's code: an x-branch, a sinusoidal t-branch, a fused hidden layer and a scalar head.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def sinusoidal_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Transformer-style embedding of the scalar times ``t`` (B,) -> (B, 2 * (dim // 2)).

    Frequencies f_i = exp(-i ln(10^4) / (dim/2 - 1)); differentiable in ``t`` (∂_t u needs it).
    """
    half = max(dim // 2, 1)
    scale = math.log(1.0e4) / max(half - 1, 1)
    freqs = torch.exp(-scale * torch.arange(half, device=t.device, dtype=t.dtype))
    angles = t[:, None] * freqs[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class PotentialMLP(nn.Module):
    """u(z, t): R^d x R -> R, one per transformation.

    x-branch Linear(d, h) + tanh; t-branch sinusoid -> Linear, GELU, Linear; fuse by sum,
    Linear(h, h) + tanh, Linear(h, 1). ``out="tanh"`` bounds u to (-1, 1) as the original code
    does; ``"linear"`` (default) leaves it unbounded so the step size sets the speed.
    ``time_scale`` multiplies t before the embedding (t in [0, 1] -> [0, 1000]).
    """

    def __init__(
        self, dim: int, hidden: int | None = None, out: str = "linear", time_scale: float = 1.0
    ) -> None:
        super().__init__()
        if out not in ("linear", "tanh"):
            raise ValueError(f"potential output head must be 'linear' or 'tanh', got '{out}'")
        hidden = hidden or dim
        self.dim, self.time_scale, self.out = dim, time_scale, out
        self.x_branch = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh())
        emb = 2 * max(dim // 2, 1)
        self.t_branch = nn.Sequential(nn.Linear(emb, hidden), nn.GELU(), nn.Linear(hidden, hidden))
        self.fuse = nn.Sequential(nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, 1))

    def forward(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """z (B, d), t (B,) -> u (B,)."""
        temb = sinusoidal_embedding(t * self.time_scale, self.dim)
        u = self.fuse(self.x_branch(z) + self.t_branch(temb)).squeeze(1)
        return torch.tanh(u) if self.out == "tanh" else u
