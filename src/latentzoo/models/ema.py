"""Exponential moving average of a module's weights (Polyak averaging).

    θ_ema ← decay · θ_ema + (1 − decay) · θ        after every optimizer step

With ``warmup=True`` the decay of update n is min(decay, (1 + n) / (10 + n)), as TensorFlow's
``ExponentialMovingAverage(num_updates=...)``: early updates follow the raw weights, so short
runs do not sample from an average still dominated by the initialisation (DiT's zero-initialised
gates make such an average nearly silent). DiT / LFM use a fixed decay (the default). With
``power=p`` (ema-pytorch's schedule, NFPI: p = 0.75) it is min(decay, 1 − (1 + n)^(−p)).

The EMA is a plain object, not a submodule, so the optimizer never sees it and the Lightning
``state_dict`` holds the raw weights; the model stores ``EMA.state_dict()`` in the checkpoint
(``on_save_checkpoint``) and restores it in ``on_load_checkpoint``. ``swapped(module)``
temporarily loads the averaged weights for sampling and evaluation.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


class EMA:
    """Shadow copy of ``module``'s floating-point parameters and buffers."""

    def __init__(
        self,
        module: nn.Module,
        decay: float = 0.9999,
        warmup: bool = False,
        power: float | None = None,
    ) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.decay = decay
        self.warmup = warmup
        self.power = power
        self.num_updates = 0
        self.shadow: dict[str, torch.Tensor] = {
            name: value.detach().clone()
            for name, value in module.state_dict().items()
            if value.is_floating_point()
        }

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        current = module.state_dict()
        names = list(self.shadow)
        shadow = [self.shadow[n] for n in names]
        if shadow and shadow[0].device != current[names[0]].device:
            self.to(current[names[0]].device)
            shadow = [self.shadow[n] for n in names]
        torch._foreach_lerp_(
            shadow,
            [current[n].detach().to(s.dtype) for n, s in zip(names, shadow, strict=True)],
            1.0 - self.current_decay(),
        )
        self.num_updates += 1

    def current_decay(self) -> float:
        """The decay of the next update (see the module docstring for ``warmup``)."""
        if self.power is not None:
            return min(self.decay, 1.0 - (1.0 + self.num_updates) ** (-self.power))
        if not self.warmup:
            return self.decay
        return min(self.decay, (1.0 + self.num_updates) / (10.0 + self.num_updates))

    def to(self, device: torch.device | str) -> EMA:
        self.shadow = {name: value.to(device) for name, value in self.shadow.items()}
        return self

    @contextmanager
    def swapped(self, module: nn.Module) -> Iterator[nn.Module]:
        """Use the EMA weights inside the block; the raw weights come back afterwards."""
        state = module.state_dict()
        backup = {name: state[name].detach().clone() for name in self.shadow}
        with torch.no_grad():
            for name, value in self.shadow.items():
                state[name].copy_(value)
        try:
            yield module
        finally:
            with torch.no_grad():
                for name, value in backup.items():
                    state[name].copy_(value)

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = set(self.shadow) ^ set(state["shadow"])
        if missing:
            raise KeyError(f"EMA state does not match the net: {sorted(missing)[:5]} ...")
        self.decay = state["decay"]
        self.num_updates = state["num_updates"]
        self.shadow = {n: v.detach().clone() for n, v in state["shadow"].items()}
