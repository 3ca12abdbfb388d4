"""A test-only callback that records, on every rank and every training step, what DDP must keep
equal (the parameters after the optimizer step) and what it must keep different (the training
randomness the step draws from, the batch).

Use: ``+callbacks.ddp_probe._target_=tests.ddp_probe.DDPProbe +callbacks.ddp_probe.out_dir=DIR``;
each rank writes ``DIR/rank<r>.json`` at the end of training.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import lightning as L
import torch


def fingerprint(tensors: list[torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for tensor in tensors:
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def first_tensor(batch: Any) -> torch.Tensor:
    if isinstance(batch, dict):
        return first_tensor(next(iter(batch.values())))
    if isinstance(batch, list | tuple):
        return first_tensor(batch[0])
    return batch


class DDPProbe(L.Callback):
    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)
        self.steps: list[dict[str, Any]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        # the step's first standard-normal draw, taken from a copy of the generator's state
        generator = torch.Generator().manual_seed(0)
        generator.set_state(torch.get_rng_state())
        noise = torch.randn(4, generator=generator)
        self.steps.append(
            {"noise": noise.tolist(), "batch": fingerprint([first_tensor(batch).float()])}
        )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        params = [p for _, p in sorted(pl_module.named_parameters())]
        record = self.steps[-1]
        record["step"] = trainer.global_step
        record["params"] = fingerprint(params)
        ema = getattr(pl_module, "ema", None)
        if ema is not None:
            record["ema"] = fingerprint([v for _, v in sorted(ema.state_dict()["shadow"].items())])

    def on_train_end(self, trainer, pl_module) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        out = self.out_dir / f"rank{trainer.global_rank}.json"
        out.write_text(json.dumps({"world": trainer.world_size, "steps": self.steps}))
