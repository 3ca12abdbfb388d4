"""Reference numbers from LFM's own networks (VinAIResearch/LFM models/, NVlabs/edm), for tests.

The fixtures in ``tests/fixtures/lfm/`` hold, for a tiny net of each LFM backbone: its config,
the parameter names and shapes of the reference state dict, its fixed buffers, fixed inputs and
the reference forward outputs (LFM's convention: ``net(t, x, y)``, t = 0 data). Weights are not
stored: :func:`reference_state_dict` fills every parameter deterministically from its name, and
the fixtures were computed from exactly those weights (``fixtures/lfm/make_fixtures.py``, run on
CPU in fp32). So a test rebuilds the reference state dict, imports it into latentzoo and must
reproduce the outputs.
"""

from __future__ import annotations

import math
import zlib
from pathlib import Path
from typing import Any

import torch

FIXTURES = Path(__file__).parent / "fixtures" / "lfm"


def fill(key: str, shape: list[int]) -> torch.Tensor:
    """A deterministic tensor for parameter ``key``: N(0, 1/fan_in) for matrices/kernels,
    1 + 0.1·N(0, 1) for 1-D weights (norm gains), 0.1·N(0, 1) for biases."""
    generator = torch.Generator().manual_seed(zlib.crc32(key.encode()))
    value = torch.randn(shape, generator=generator, dtype=torch.float32)
    if len(shape) >= 2:
        return value / math.sqrt(math.prod(shape[1:]))
    return 0.1 * value + (1.0 if key.endswith("weight") else 0.0)


def load_fixture(name: str) -> dict[str, Any]:
    return torch.load(FIXTURES / f"{name}.pt", weights_only=True)


def reference_state_dict(fixture: dict[str, Any], prefix: str = "") -> dict[str, torch.Tensor]:
    """The reference net's state dict (as LFM saves it; ``prefix="module."`` for DDP runs)."""
    state = {key: fill(key, shape) for key, shape in fixture["shapes"].items()}
    state.update(fixture["buffers"])
    return {prefix + key: value for key, value in state.items()}
