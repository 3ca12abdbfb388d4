"""Stop long sampling promptly on SIGINT/SIGTERM.

:class:`~latentzoo.callbacks.checkpointing.Checkpoints` turns a stop signal into a flag (its
``stop_requested``) and acts on it at the end of the current batch. Sampling callbacks (image
grids, FID) can run for minutes inside one hook, e.g. an adaptive ODE solve at the end of
training, so they sample under :func:`abort_on_stop`: once the flag is set, the next forward of
any ``nn.Module`` raises :class:`SamplingInterrupted`. That covers every model's ``sample``,
solver step and batch (and torchdiffeq's solvers) without each loop polling the flag; the
callback catches it, skips its output with one log line, and the run stops and saves as usual.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import lightning as L
from torch.nn.modules.module import register_module_forward_pre_hook


class SamplingInterrupted(Exception):
    """A stop signal arrived while a callback was sampling."""


def _flag_holders(trainer: L.Trainer | None) -> list[Any]:
    callbacks = getattr(trainer, "callbacks", None) or []
    return [callback for callback in callbacks if hasattr(callback, "stop_requested")]


def stop_requested(trainer: L.Trainer | None) -> bool:
    """Whether a stop signal reached this process during training (this rank's flag)."""
    return any(holder.stop_requested for holder in _flag_holders(trainer))


@contextlib.contextmanager
def abort_on_stop(trainer: L.Trainer | None) -> Iterator[None]:
    """Within this block, raise :class:`SamplingInterrupted` at the next module forward once a
    stop signal arrived (a net evaluation in progress finishes first)."""
    holders = _flag_holders(trainer)
    if not holders:  # no signal handling installed: nothing to watch
        yield
        return

    def check(module: Any, args: Any) -> None:
        if any(holder.stop_requested for holder in holders):
            raise SamplingInterrupted("stopping on a signal")

    handle = register_module_forward_pre_hook(check)
    try:
        yield
    finally:
        handle.remove()
