"""Ctrl-C and SLURM's SIGTERM stop an ensemble at a step boundary, never inside a step.

As for single runs (``callbacks.Checkpoints(save_on_signal=True)``), the handler only sets a
flag; the training loop reads it after a whole step, saves there and stops, so the ensemble
checkpoint never holds half an optimizer update or a loader one batch ahead of the step. A
second signal acts at once (nothing is saved then: the last checkpoint stays). Under DDP the
ranks agree on the flag every ``check_every`` steps (one tiny all-reduce), so that all of them
stop, and gather the checkpoint, at the same step.
"""

from __future__ import annotations

import signal
import sys
import threading
from typing import Any

import torch
import torch.distributed as dist

STOP_SIGNALS = ("SIGINT", "SIGTERM")


class StopSignals:
    """``with StopSignals() as stop: ... if stop.agreed(step): <save and stop>``."""

    def __init__(self, check_every: int = 10) -> None:
        self.signum: int | None = None
        self.check_every = check_every
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():  # handlers live there only
            for name in STOP_SIGNALS:
                signum = getattr(signal, name)
                self._previous[signum] = signal.getsignal(signum)
                signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:  # the second signal: act at once, as without this
            self.__exit__()
            signal.raise_signal(signum)
            return
        self.signum = signum
        print(
            f"{signal.Signals(signum).name}: the ensemble saves and stops after this step "
            "(send it again to stop at once, without saving)",
            file=sys.stderr,
            flush=True,
        )

    def agreed(self, step: int) -> bool:
        """Whether to stop after ``step``: this process's flag or, under DDP, any rank's (read
        every ``check_every`` steps, the same steps on every rank)."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self.signum is not None
        if step % self.check_every:
            return False
        device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        flag = torch.tensor([0 if self.signum is None else 1], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and self.signum is None:
            self.signum = int(signal.SIGTERM)  # another rank's signal
        return bool(flag.item())
