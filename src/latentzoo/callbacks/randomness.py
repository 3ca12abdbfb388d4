"""One run seed drives everything, and a resumed run continues the same streams (DESIGN.md,
"Contracts at scale": seeds, checkpoints).

``train.py`` seeds every process with the run seed before the model is built, so every rank
starts from the same weights. Once the processes know their rank (``setup``, before the first
batch), this callback re-seeds python, numpy and torch on each rank from ``(seed, rank)``: noise,
t, masks, posterior samples and augmentations then differ between ranks, and the same seed and
world size reproduce the same run.

**The training stream.** The RNG states (torch CPU and CUDA, numpy, python) are captured at the
end of every training batch and put back at the start of the next one. Whatever runs in between
(validation, sanity checks, image/metric callbacks that sample, dataloader iterator creation,
checkpoint saves) therefore never shifts the randomness of training steps, and the stream of
step ``n + 1`` is a function of the stream after step ``n`` only.

**Resume.** The captured states of every rank are gathered to rank 0 at save time (all ranks
run ``dump_checkpoint``; only rank 0 writes) and saved under this callback's entry of
``checkpoint["callbacks"]``; on resume each rank takes its own and restores it at the first
training batch, i.e. after the dataloader iterator was created and the sanity check ran. With
the data loaders of :mod:`latentzoo.data.resumable` (order and per-batch randomness from
``(seed, epoch, rank, batch)``, position saved by Lightning) a run killed at any step and
resumed from its ``last.ckpt`` continues bit for bit (same world size; CPU or deterministic
algorithms).
"""

from __future__ import annotations

import random
from typing import Any

import lightning as L
import numpy as np
import torch

from latentzoo.utils.logging import RankedLogger

log = RankedLogger(__name__, rank_zero_only=True)


def rank_seed(seed: int, rank: int) -> int:
    """A 32-bit seed for ``rank``'s training randomness, decorrelated by numpy's SeedSequence."""
    return int(np.random.SeedSequence([int(seed), int(rank)]).generate_state(1)[0])


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # all devices too


def capture_rng() -> tuple[Any, ...]:
    """This process's RNG states, as the libraries return them (cheap: done every step)."""
    cuda = None
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        cuda = torch.cuda.get_rng_state_all()
    return torch.get_rng_state(), np.random.get_state(), random.getstate(), cuda


def restore_rng(state: tuple[Any, ...]) -> None:
    torch_state, np_state, py_state, cuda = state
    torch.set_rng_state(torch_state)
    np.random.set_state(np_state)
    random.setstate(py_state)
    if cuda is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def rng_to_checkpoint(state: tuple[Any, ...]) -> dict[str, Any]:
    """:func:`capture_rng`'s states as tensors and plain values (``weights_only=True`` loads)."""
    torch_state, (kind, keys, pos, has_gauss, gauss), (version, internal, gauss_next), cuda = state
    out: dict[str, Any] = {
        "torch": torch_state,
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "python": {
            "version": int(version),
            "internal": torch.tensor(internal, dtype=torch.int64),
            "gauss_next": gauss_next,
        },
    }
    if cuda is not None:
        out["cuda"] = cuda
    return out


def rng_from_checkpoint(saved: dict[str, Any]) -> tuple[Any, ...]:
    n, p = saved["numpy"], saved["python"]
    keys = n["keys"].numpy().astype(np.uint32)
    np_state = (n["kind"], keys, n["pos"], n["has_gauss"], n["gauss"])
    py_state = (p["version"], tuple(int(x) for x in p["internal"].tolist()), p["gauss_next"])
    return saved["torch"], np_state, py_state, saved.get("cuda")


def _gather(obj: Any, world_size: int) -> list[Any]:
    """``obj`` of every rank, in rank order (a collective: every rank must call it)."""
    if world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        out: list[Any] = [None] * world_size
        torch.distributed.all_gather_object(out, obj)
        return out
    return [obj]


class TrainingRandomness(L.Callback):
    """Per-rank training randomness from ``(seed, global rank)``; saved and restored on resume.

    Put it first in the callback list, so that its batch-start restore comes before, and its
    batch-end capture before, any other callback's sampling.
    """

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)
        self._stream: tuple[Any, ...] | None = None  # the training stream between two batches
        self._world_size = 1
        self._resumed = False

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._world_size = trainer.world_size
        seed_all(rank_seed(self.seed, trainer.global_rank))
        self._stream = capture_rng()  # sanity checks etc. then do not shift step 1
        log.info(
            f"Seeding: weights from seed {self.seed} on every rank; training randomness from "
            f"(seed {self.seed}, rank r) for r < {trainer.world_size}; data order and per-batch "
            "randomness from (seed, epoch, rank, batch)"
        )

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        if self._stream is not None:
            restore_rng(self._stream)

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        self._stream = capture_rng()

    def state_dict(self) -> dict[str, Any]:
        states = _gather(rng_to_checkpoint(self._stream or capture_rng()), self._world_size)
        return {"seed": self.seed, "world_size": len(states), "rng": states}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        states = state_dict.get("rng") or []
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        if int(state_dict.get("seed", self.seed)) != self.seed:
            log.warning(
                f"Resuming with seed {self.seed} but the checkpoint was trained with seed "
                f"{state_dict.get('seed')}: training randomness is re-seeded, not continued"
            )
        elif len(states) != self._world_size or rank >= len(states):
            log.warning(
                f"Resuming on {self._world_size} processes from a checkpoint saved by "
                f"{len(states)}: training randomness is re-seeded per rank, not continued"
            )
        else:
            self._stream = rng_from_checkpoint(states[rank])
            self._resumed = True
