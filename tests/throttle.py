"""A callback that slows training down, so a test can kill a run in the middle of it:
``+callbacks.throttle._target_=tests.throttle.Throttle +callbacks.throttle.seconds=0.2``."""

from __future__ import annotations

import time

import lightning as L


class Throttle(L.Callback):
    def __init__(self, seconds: float = 0.1) -> None:
        self.seconds = seconds

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        time.sleep(self.seconds)
