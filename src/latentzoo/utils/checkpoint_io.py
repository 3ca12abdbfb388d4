"""Every checkpoint Lightning writes goes through :class:`AtomicCheckpointIO`: atomic (temp file in
the same folder, fsync, rename) and never with non-finite weights. Plus the helpers that name the
last good checkpoint and the command that resumes from it.
"""

from __future__ import annotations

import math
import os
import shlex
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol

from latentzoo.utils.atomic import atomic_write
from latentzoo.utils.logging import RankedLogger
from latentzoo.utils.safe_load import to_plain

log = RankedLogger(__name__, rank_zero_only=True)


def _tensors(value: Any, prefix: str) -> Iterator[tuple[str, torch.Tensor]]:
    if isinstance(value, torch.Tensor):
        yield prefix, value
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield from _tensors(item, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            yield from _tensors(item, f"{prefix}.{index}")
    elif isinstance(value, float) and not math.isfinite(value):
        yield prefix, torch.tensor(value)


def nonfinite_entries(checkpoint: Mapping[str, Any], keys: tuple[str, ...] = ("state_dict", "ema")):
    """Names of the NaN/inf floating tensors under ``checkpoint[key]`` for ``key`` in ``keys``
    (the raw weights and the EMA average); empty when all are finite."""
    bad = []
    for key in keys:
        for name, tensor in _tensors(checkpoint.get(key), key):
            if (tensor.is_floating_point() or tensor.is_complex()) and not bool(
                torch.isfinite(tensor).all()
            ):
                bad.append(name)
    return bad


def describe_entries(entries: list[str]) -> str:
    shown = ", ".join(entries[:3])
    return shown + (f" and {len(entries) - 3} more" if len(entries) > 3 else "")


class AtomicCheckpointIO(TorchCheckpointIO):
    """:class:`TorchCheckpointIO` whose saves are atomic, hold only plain values and refuse
    non-finite weights, and whose loads run no code from the file.

    A checkpoint is written to a temp file next to its target, flushed, fsynced and renamed
    over the target, so a kill at any instant leaves the previous checkpoint intact. One whose
    ``state_dict`` (or ``ema`` entry) holds NaN/inf is not written; a warning names the last
    finite checkpoint instead. Remote (fsspec) paths use Lightning's own writer after the check.
    Omegaconf containers, numpy values and paths (e.g. in ``hyper_parameters``) are saved as
    plain values, so the file loads with ``weights_only=True``; local loads go through
    :func:`~latentzoo.utils.safe_load.read_checkpoint` (``trust``: ``trust_checkpoint=true``).
    """

    def __init__(self, trust: bool = False) -> None:
        super().__init__()
        self.trust = trust
        self.last_written: tuple[str, int | None] | None = None  # (path, global step)
        self.refused: list[str] = []

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options")
        bad = nonfinite_entries(checkpoint)
        if bad:
            self.refused.append(str(path))
            log.warning(
                f"Not writing {path}: non-finite weights ({describe_entries(bad)}). "
                f"{last_finite_sentence(self.last_written)}"
            )
            return
        checkpoint = to_plain(checkpoint)
        if _is_local_file_protocol(path):
            with atomic_write(Path(path), "wb") as file:
                torch.save(checkpoint, file)
        else:
            super().save_checkpoint(checkpoint, path)
        self.last_written = (os.path.abspath(path), checkpoint.get("global_step"))

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: Any = None):
        if not _is_local_file_protocol(path):  # remote: Lightning's loader, never unpickling code
            return super().load_checkpoint(path, weights_only=self.trust is not True)
        from latentzoo.utils.checkpoint import load_checkpoint

        return load_checkpoint(path, trust=self.trust)


def install_atomic_checkpoint_io(trainer: Any, trust: bool = False) -> None:
    """Make ``trainer`` write and read checkpoints through :class:`AtomicCheckpointIO`
    (``trust``: ``trust_checkpoint=true``, loads pickled objects of a checkpoint you trust).

    Replaces Lightning's default :class:`TorchCheckpointIO`; a different, user-chosen
    CheckpointIO is left alone (with a warning)."""
    strategy = trainer.strategy
    current = getattr(strategy, "_checkpoint_io", None)
    if isinstance(current, AtomicCheckpointIO):
        current.trust = trust
        return
    if current is None or type(current) is TorchCheckpointIO:
        strategy.checkpoint_io = AtomicCheckpointIO(trust)
        return
    inner = getattr(current, "checkpoint_io", None)  # e.g. AsyncCheckpointIO wraps another one
    if hasattr(current, "checkpoint_io") and (inner is None or type(inner) is TorchCheckpointIO):
        current.checkpoint_io = AtomicCheckpointIO(trust)
        return
    log.warning(
        f"{type(current).__name__} writes the checkpoints, not AtomicCheckpointIO: saves may not "
        "be atomic and are not checked for non-finite weights"
    )


def last_finite_checkpoint(trainer: Any) -> tuple[str, int | None] | None:
    """(path, global step) of the last checkpoint this run wrote (all finite by construction),
    else the checkpoint it resumed from, else None."""
    if trainer is None:
        return None
    io = getattr(trainer.strategy, "_checkpoint_io", None)
    if not isinstance(io, AtomicCheckpointIO):
        io = getattr(io, "checkpoint_io", None)  # a wrapper such as AsyncCheckpointIO
    if isinstance(io, AtomicCheckpointIO):
        if io.last_written and Path(io.last_written[0]).is_file():
            return io.last_written
    else:  # not checked for finiteness when written; the best we know
        last = getattr(getattr(trainer, "checkpoint_callback", None), "last_model_path", "")
        if last and Path(last).is_file():
            return os.path.abspath(last), None
    if getattr(trainer, "ckpt_path", None):
        return os.path.abspath(trainer.ckpt_path), None
    return None


def resume_command(ckpt_path: str | os.PathLike) -> str:
    """``python train.py <this run's overrides> ckpt_path=<abs path>``."""
    overrides: list[str] = []
    try:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            overrides = list(HydraConfig.get().overrides.task)
    except Exception:  # no Hydra run (e.g. a bare Trainer in a notebook)
        overrides = []
    kept = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") != "ckpt_path"]
    args = [*kept, f"ckpt_path={os.path.abspath(ckpt_path)}"]
    return "python train.py " + " ".join(shlex.quote(a) for a in args)


def last_finite_sentence(last: tuple[str, int | None] | None) -> str:
    if last is None:
        return "No finite checkpoint was written before (nothing to resume from)."
    path, step = last
    at = f" (global step {step})" if step is not None else ""
    return f"The last finite checkpoint is {path}{at}; resume from it with: {resume_command(path)}"


def resume_advice(trainer: Any) -> str:
    """One sentence for error messages: the last finite checkpoint and how to resume from it."""
    return last_finite_sentence(last_finite_checkpoint(trainer))


class TrainingInterrupted(SystemExit):
    """Training stopped on SIGINT/SIGTERM after saving ``last.ckpt`` at the current step.

    Exits with status 128 + the signal number (130 for Ctrl-C, 143 for SIGTERM)."""

    def __init__(self, signame: str, signum: int, checkpoint: str | None, step: int) -> None:
        super().__init__(128 + signum)
        self.signame = signame
        self.checkpoint = checkpoint
        self.step = step
        self.resume_command = resume_command(checkpoint) if checkpoint else None

    def __str__(self) -> str:
        saved = f"saved {self.checkpoint}" if self.checkpoint else "no checkpoint could be saved"
        return f"interrupted by {self.signame} at global step {self.step}; {saved}"
