"""Probability path, velocity wrappers and ODE samplers for flow matching.

**Time convention (latentzoo; Lipman et al. 2023, torchcfm, facebookresearch/flow_matching):
t = 0 is noise, t = 1 is data.** With σ_min the noise floor at the data end:

    x_t = (1 − (1 − σ_min)·t)·ε + t·x_1          u_t = dx_t/dt = x_1 − (1 − σ_min)·ε

Sampling integrates dx/dt = v(x, t) from t = 0 (x ~ N(0, I)) to t = 1. This is the same path
as LFM's code (t = 0 data, t = 1 noise) under t_LZ = 1 − t_LFM with v_LZ(x, t) = −v_LFM(x, 1 − t);
``convert_lfm`` wraps a net trained in LFM's convention.

Solvers (``solve``): ``euler`` (N steps, N NFE), ``midpoint`` (2N NFE), ``heun`` (N steps with
Heun's correction, 2N NFE), ``heun_edm`` (Heun with a plain Euler last step, 2N − 1 NFE), and
any torchdiffeq method by name (``dopri5`` default for FID, ``dopri8``, ``bosh3``,
``adaptive_heun``, ``rk4``, ...; adaptive ones use rtol/atol, fixed-grid ones ``steps``).
NFE counts calls of the (guided) velocity field: one CFG doubled-batch forward is 1 NFE.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

Field = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # v(x, t), t of shape (B,)

OWN_SOLVERS = ("euler", "midpoint", "heun", "heun_edm")
ADAPTIVE_SOLVERS = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun")
FIXED_GRID_SOLVERS = ("rk4", "heun2", "heun3", "explicit_adams", "implicit_adams", "fixed_adams")
SAMPLER_KEYS = ("name", "steps", "rtol", "atol")  # a model's `sampler:` settings; name -> method


@dataclass
class StraightPath:
    """Conditional optimal-transport path between N(0, I) (t = 0) and data (t = 1)."""

    sigma_min: float = 1e-5

    def sample(
        self, x1: torch.Tensor, eps: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (x_t, u_t) for data x1, noise eps and per-sample times t (B,)."""
        tb = t.view(-1, *([1] * (x1.dim() - 1))).to(x1.dtype)
        xt = (1 - (1 - self.sigma_min) * tb) * eps + tb * x1
        ut = x1 - (1 - self.sigma_min) * eps
        return xt, ut


def convert_lfm(velocity: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """Wrap a velocity trained in LFM's convention (t = 0 data) into latentzoo's (t = 0 noise)."""

    def wrapped(x: torch.Tensor, t: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return -velocity(x, 1 - t, *args, **kwargs)

    return wrapped


def guided_field(
    net: Callable[..., torch.Tensor],
    y: torch.Tensor | None,
    null_label: int | None,
    cfg_scale: float = 1.0,
) -> Field:
    """v(x, t) = v_u + s·(v_c − v_u), computed as one doubled batch [x; x] with labels [y; null].

    ``s = 1`` (or no labels) is a single conditional forward. ``s = 1 + w`` in the
    flow_matching library's (1 + w)·v_c − w·v_u notation.
    """
    if y is None or cfg_scale == 1.0:
        return lambda x, t: net(x, t, y)
    if null_label is None:
        raise ValueError(
            "classifier-free guidance needs a null label (train with label_dropout > 0)"
        )
    y_null = torch.full_like(y, null_label)
    labels = torch.cat([y, y_null])

    def field(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        v_cond, v_uncond = net(torch.cat([x, x]), torch.cat([t, t]), labels).chunk(2)
        return v_uncond + cfg_scale * (v_cond - v_uncond)

    return field


class CountingField:
    """Counts evaluations (NFE) of a velocity field."""

    def __init__(self, field: Field) -> None:
        self.field, self.nfe = field, 0

    def __call__(self, x: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        self.nfe += 1
        if not torch.is_tensor(t) or t.dim() == 0:
            t = torch.full((x.shape[0],), float(t), device=x.device, dtype=x.dtype)
        return self.field(x, t)


def solve(
    field: Field,
    x0: torch.Tensor,
    method: str = "dopri5",
    steps: int | None = None,
    t0: float = 0.0,
    t1: float = 1.0,
    rtol: float = 1e-5,
    atol: float = 1e-5,
) -> tuple[torch.Tensor, int]:
    """Integrate dx/dt = field(x, t) from t0 to t1; return (x(t1), NFE)."""
    if method not in OWN_SOLVERS + ADAPTIVE_SOLVERS + FIXED_GRID_SOLVERS:
        known = ", ".join(OWN_SOLVERS + ADAPTIVE_SOLVERS + FIXED_GRID_SOLVERS)
        raise ValueError(f"unknown sampler '{method}'; known: {known}")
    f = CountingField(field)
    if method in OWN_SOLVERS:
        if not steps or steps < 1:
            raise ValueError(f"sampler '{method}' needs steps >= 1, got {steps}")
        grid = torch.linspace(t0, t1, steps + 1, dtype=torch.float64).tolist()
        x = x0
        for i, (ta, tb) in enumerate(zip(grid[:-1], grid[1:], strict=True)):
            h = tb - ta
            d1 = f(x, ta)
            if method == "euler" or (method == "heun_edm" and i == steps - 1):
                x = x + h * d1
            elif method == "midpoint":
                x = x + h * f(x + 0.5 * h * d1, ta + 0.5 * h)
            else:  # heun: trapezoid of the slopes at both ends
                x = x + 0.5 * h * (d1 + f(x + h * d1, tb))
        return x, f.nfe
    try:
        from torchdiffeq import odeint
    except ImportError as error:  # core dependency, but keep the message clear
        raise ImportError(
            f"sampler '{method}' needs torchdiffeq: pip install torchdiffeq"
        ) from error
    options = None
    if method not in ADAPTIVE_SOLVERS:
        if not steps:
            raise ValueError(f"fixed-grid torchdiffeq method '{method}' needs steps")
        options = {"step_size": (t1 - t0) / steps}
    times = torch.tensor([t0, t1], device=x0.device, dtype=x0.dtype)
    out = odeint(
        lambda t, x: f(x, t), x0, times, method=method, rtol=rtol, atol=atol, options=options
    )
    return out[-1], f.nfe
