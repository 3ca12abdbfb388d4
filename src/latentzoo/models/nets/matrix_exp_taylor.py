"""Matrix exponentials without host synchronisation (issue 19, target 4).

``torch.linalg.matrix_exp`` picks its polynomial degree and number of squarings from the matrix
norm on the host: on CUDA every call (and its backward, an exponential of a 2n×2n block matrix)
waits for the device. The MEF flow calls it twice per flow step, so a CIFAR step synchronised
hundreds of times. Both functions here keep every decision on the device:

* :func:`matrix_exp_taylor` — e^A by truncated Taylor series + scaling and squaring. The number of
  squarings s = ⌈log2(‖A‖₁/θ)⌉ is computed per matrix *on the device*; a fixed number
  ``max_squarings`` of masked squarings then applies exactly s of them to each matrix. With
  ``degree`` 18 and θ = 1 the truncation error of e^X for ‖X‖₁ ≤ 1 is at most
  Σ_{k>18} 1/k! < 1.7e-17 (relative), so the result is exact to rounding for every
  ‖A‖₁ ≤ θ·2^max_squarings (= 65,536 by default); beyond that range the scaling is clamped and
  the series loses accuracy (never reached: e^A overflows float32 from ‖A‖ ≈ 88).
* :func:`matrix_exp_action` — e^M·x for a batch of small matrices without forming e^M:
  ``substeps`` applications of the degree-``degree`` Taylor polynomial of M/substeps to the
  vector. Mat-vec products cost c² per term instead of c³ for a matrix product, and the backward
  is a few more mat-vecs (the torch backward exponentiates a 2c×2c matrix). Accuracy: for
  ‖M/substeps‖₁ ≤ θ the truncation error per substep is at most θ^(m+1)/(m+1)!·e^θ relative to
  ‖x‖ (θ = 2, m = 16: 2.7e-9); :func:`action_substeps` picks the substeps from a norm bound.
"""

from __future__ import annotations

import math

import torch

TAYLOR_DEGREE = 18
TAYLOR_THETA = 1.0
MAX_SQUARINGS = 16
ACTION_DEGREE = 16
ACTION_THETA = 2.0


def matrix_exp_taylor(
    a: torch.Tensor,
    degree: int = TAYLOR_DEGREE,
    theta: float = TAYLOR_THETA,
    max_squarings: int = MAX_SQUARINGS,
) -> torch.Tensor:
    """e^A for a batch ``(..., n, n)``: Taylor of A/2^s (Horner) + s squarings, s per matrix on
    the device (see the module docstring for the accuracy argument)."""
    norm = a.detach().abs().sum(-2).amax(-1)  # ‖A‖₁ per matrix
    s = torch.ceil(torch.log2(norm.clamp_min(1e-30) / theta)).clamp(0, max_squarings)
    x = a * torch.exp2(-s)[..., None, None]
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device).expand_as(a)
    e = eye
    for k in range(degree, 0, -1):  # I + X(I + X/2(I + X/3(...)))
        e = eye + (x @ e) / k
    for j in range(max_squarings):
        e = torch.where((s > j)[..., None, None], e @ e, e)
    return e


def action_substeps(norm_bound: float, theta: float = ACTION_THETA, margin: float = 1.5) -> int:
    """Substeps for :func:`matrix_exp_action` when ‖M‖₁ ≤ ``norm_bound`` (with a margin for the
    parameters moving between two refreshes of the bound)."""
    return max(1, math.ceil(margin * float(norm_bound) / theta))


def matrix_exp_action(
    m: torch.Tensor, x: torch.Tensor, substeps: int = 1, degree: int = ACTION_DEGREE
) -> torch.Tensor:
    """e^M·x for ``m`` (..., c, c) and ``x`` (..., c), as ``substeps`` Taylor steps of M/substeps.

    Accurate to ~1e-9 relative when ‖M‖₁ ≤ θ·substeps (θ = 2 for degree 16)."""
    x = x.unsqueeze(-1)
    step = m / substeps
    for _ in range(substeps):
        term, total = x, x
        for k in range(1, degree + 1):
            term = (step @ term) / k
            total = total + term
        x = total
    return x.squeeze(-1)
