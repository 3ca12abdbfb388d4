"""Exponential moving average of a module's weights (Polyak averaging).

    θ_ema ← decay · θ_ema + (1 − decay) · θ        after every optimizer step

With ``warmup=True`` the decay of update n is min(decay, (1 + n) / (10 + n)), as TensorFlow's
``ExponentialMovingAverage(num_updates=...)``: early updates follow the raw weights, so short
runs do not sample from an average still dominated by the initialisation (DiT's zero-initialised
gates make such an average nearly silent). DiT / LFM use a fixed decay (the default). With
``power=p`` (ema-pytorch's schedule, NFPI: p = 0.75) it is min(decay, 1 − (1 + n)^(−p)).

The contract (DESIGN.md, "Contracts at scale": weights): the average is a separate copy of the
module (``EMA.module``), not a submodule, so the optimizer never sees it, ``state_dict`` always
holds the raw weights, and sampling/eval call the copy directly: nothing is ever swapped, so a
checkpoint written at any moment holds the raw weights. Models store ``EMA.state_dict()`` in its
own checkpoint entry through :class:`EMACheckpoint`.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from latentzoo.utils.logging import RankedLogger

log = RankedLogger(__name__, rank_zero_only=True)


class EMA:
    """An averaged copy of ``module`` (eval mode, no gradients)."""

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
        self.module = copy.deepcopy(module).eval().requires_grad_(False)

    @property
    def shadow(self) -> dict[str, torch.Tensor]:
        """The averaged floating-point parameters and buffers, by name."""
        return {n: v for n, v in self.module.state_dict().items() if v.is_floating_point()}

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        """One averaging step towards ``module``'s current weights; other buffers are copied
        (e.g. ActNorm's "initialised" flags), so the copy behaves like the raw module."""
        current = module.state_dict()
        average = self.module.state_dict()
        first = next(iter(current.values()), None)
        if first is not None and next(iter(average.values())).device != first.device:
            self.to(first.device)
            average = self.module.state_dict()
        names = [n for n, v in average.items() if v.is_floating_point()]
        if names:
            torch._foreach_lerp_(
                [average[n] for n in names],
                [current[n].detach().to(average[n].dtype) for n in names],
                1.0 - self.current_decay(),
            )
        for name, value in average.items():
            if not value.is_floating_point():
                value.copy_(current[name])
        self.num_updates += 1

    @torch.no_grad()
    def reset(self, module: nn.Module) -> None:
        """Restart the average at ``module``'s weights (e.g. the raw weights just loaded)."""
        self.module.load_state_dict(module.state_dict())
        self.num_updates = 0

    def current_decay(self) -> float:
        """The decay of the next update (see the module docstring for ``warmup``)."""
        if self.power is not None:
            return min(self.decay, 1.0 - (1.0 + self.num_updates) ** (-self.power))
        if not self.warmup:
            return self.decay
        return min(self.decay, (1.0 + self.num_updates) / (10.0 + self.num_updates))

    def to(self, device: torch.device | str) -> EMA:
        self.module.to(device)
        return self

    def state_dict(self) -> dict[str, Any]:
        return {
            "decay": self.decay,
            "num_updates": self.num_updates,
            "shadow": {n: v.detach().clone() for n, v in self.module.state_dict().items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        own = self.module.state_dict()
        saved = state["shadow"]
        floats = {n for n, v in own.items() if v.is_floating_point()}
        if floats - set(saved) or set(saved) - set(own):
            mismatch = sorted((floats - set(saved)) | (set(saved) - set(own)))
            raise KeyError(f"EMA state does not match the net: {mismatch[:5]} ...")
        self.decay = state["decay"]
        self.num_updates = state["num_updates"]
        # older checkpoints hold float entries only: the others keep the module's own values
        self.module.load_state_dict({**own, **saved})


class EMACheckpoint:
    """LightningModule mixin: ``self.ema`` (or None) averages ``self.ema_source()``.

    Saves the average in ``checkpoint["ema"]``, and restores it *after* the raw weights are
    loaded, whatever order the loader calls the hooks in: a checkpoint without an average starts
    one from the loaded raw weights (never from the initialisation).
    """

    ema: EMA | None
    _pending_ema: dict[str, Any] | None = None

    def ema_source(self) -> nn.Module:
        raise NotImplementedError

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)  # type: ignore[misc]
        if self.ema is not None:
            checkpoint["ema"] = self.ema.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)  # type: ignore[misc]
        self._pending_ema = checkpoint.get("ema")

    def load_state_dict(self, state_dict: Any, *args: Any, **kwargs: Any) -> Any:
        result = super().load_state_dict(state_dict, *args, **kwargs)  # type: ignore[misc]
        if self.ema is not None:
            pending, self._pending_ema = self._pending_ema, None
            if pending is not None:
                self.ema.load_state_dict(pending)
            else:
                log.warning("no EMA weights with these weights: the EMA restarts from them")
                self.ema.reset(self.ema_source())
        return result
