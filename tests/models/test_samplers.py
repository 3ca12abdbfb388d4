"""The ODE solvers evaluate the field at the right times (time-dependent fields with closed forms).

Two kinds of fields:
- x-independent, dx/dt = g(t) = 3t²: each fixed-step scheme is then a quadrature rule whose value
  has a closed form (Euler: left Riemann sum; Heun: trapezoid; midpoint: midpoint rule), so the
  time points are pinned to float64 precision.
- dx/dt = 2t·x + 2t·e^{t²} with exact solution x(t) = e^{t²}·(x0 + t²), x(1) = e·(x0 + 1): its
  end point changes when the time is reversed, and it checks the corrector uses the predicted state.
"""

from __future__ import annotations

import math

import pytest
import torch

from latentzoo.models.samplers import solve

N = 8
H = 1.0 / N
GRID = [k * H for k in range(N + 1)]


def g(t: float) -> float:
    return 3 * t * t


def quadrature_field(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return (3 * t * t).view(-1, 1).expand_as(x).to(x.dtype)


# closed forms of each scheme on dx/dt = g(t), x0 = 0 (∫ g = 1)
LEFT = sum(H * g(t) for t in GRID[:-1])  # Euler: the slope at each step's start
TRAPEZOID = sum(H / 2 * (g(a) + g(b)) for a, b in zip(GRID[:-1], GRID[1:], strict=True))
MIDPOINT = sum(H * g(a + H / 2) for a in GRID[:-1])
HEUN_EDM = TRAPEZOID - H / 2 * (g(GRID[-2]) + g(1.0)) + H * g(GRID[-2])  # Euler last step


@pytest.mark.parametrize(
    "method,expected,nfe",
    [
        ("euler", LEFT, N),
        ("heun", TRAPEZOID, 2 * N),
        ("midpoint", MIDPOINT, 2 * N),
        ("heun_edm", HEUN_EDM, 2 * N - 1),
    ],
)
def test_fixed_step_schemes_use_the_right_time_points(method: str, expected: float, nfe: int):
    x, count = solve(quadrature_field, torch.zeros(2, 1, dtype=torch.float64), method, steps=N)
    assert count == nfe
    assert x[0, 0].item() == pytest.approx(expected, abs=1e-12)
    # the closed forms differ by ≥ 1/(4N²) from each other and from ∫ g = 1: a wrong time point
    # (Euler at the end, Heun's corrector at the start, midpoint off-centre) cannot pass
    others = {LEFT, TRAPEZOID, MIDPOINT, 1.0} - {expected}
    assert all(abs(expected - other) > 1e-3 for other in others)


def exact_field(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    tb = t.view(-1, 1).to(x.dtype)
    return 2 * tb * x + 2 * tb * torch.exp(tb * tb)


X0 = torch.tensor([[-1.5], [0.0], [2.0]], dtype=torch.float64)
EXACT = math.e * (X0 + 1)


def rel_err(method: str, steps: int | None = None, **kw) -> float:
    x, _ = solve(exact_field, X0, method, steps=steps, **kw)
    return float((x - EXACT).norm() / EXACT.norm())


def test_euler_is_first_order_on_a_time_dependent_field() -> None:
    e50, e100 = rel_err("euler", 50), rel_err("euler", 100)
    assert 1.8 < e50 / e100 < 2.2 and e100 < 3e-2
    assert rel_err("euler", 1000) < 3e-3


@pytest.mark.parametrize("method", ["heun", "midpoint", "heun_edm"])
def test_second_order_schemes_on_a_time_dependent_field(method: str) -> None:
    e10, e20 = rel_err(method, 10), rel_err(method, 20)
    if method == "heun_edm":  # the plain Euler last step makes it first order overall
        assert e20 < rel_err("euler", 20) / 2
        return
    assert 3.5 < e10 / e20 < 4.5  # second order: a wrong time point makes it first order
    assert e20 < 5e-3


@pytest.mark.parametrize("method,tol", [("dopri5", 1e-7), ("bosh3", 1e-5), ("dopri8", 1e-4)])
def test_adaptive_solvers_reach_the_exact_end_point(method: str, tol: float) -> None:
    assert rel_err(method, rtol=1e-8, atol=1e-8) < tol
    # the time-reversed field ends elsewhere: the check would see a reversed grid
    reversed_end, _ = solve(lambda x, t: exact_field(x, 1 - t), X0, method, rtol=1e-8, atol=1e-8)
    assert float((reversed_end - EXACT).norm() / EXACT.norm()) > 1e-2


def test_rk4_by_name_is_accurate() -> None:
    assert rel_err("rk4", 20) < 1e-5


def test_solvers_refuse_bad_settings() -> None:
    with pytest.raises(ValueError, match="unknown sampler"):
        solve(exact_field, X0, "nope")
    with pytest.raises(ValueError, match="needs steps"):
        solve(exact_field, X0, "euler")
