"""Each member draws its training noise from its own stream, the one its single run would use.

A single run seeds torch with ``rank_seed(seed, rank)`` (``callbacks.randomness``) and its models
draw with ``torch.randn_like`` / ``torch.rand`` from the default generators. Inside the
ensemble's ``vmap`` those calls would draw one tensor for all members (or, with
``randomness="different"``, a tensor unrelated to any single run). :class:`MemberNoise`
intercepts them at the Python level and answers each member's share from that member's own
generators (CPU and accelerator, seeded like the single run's), so member k sees exactly the
numbers of ``train.py seed=s_k``. Under ``vmap`` the K draws are stacked and handed back as one
batched tensor; in the per-member loop (:attr:`member` set) one member's draw is returned.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch._C._functorch import _add_batch_dim, maybe_current_level
from torch.overrides import TorchFunctionMode

from latentzoo.callbacks.randomness import rank_seed
from latentzoo.utils.errors import LatentzooError

_LIKE = {torch.randn_like: torch.randn, torch.rand_like: torch.rand}
_FACTORY = {torch.randn, torch.rand}
# random ops the models do not use today; refused so that no member silently shares noise
_REFUSED = {
    torch.randint,
    torch.randint_like,
    torch.randperm,
    torch.bernoulli,
    torch.multinomial,
    torch.normal,
    torch.Tensor.normal_,
    torch.Tensor.uniform_,
    torch.Tensor.bernoulli_,
    torch.Tensor.random_,
    torch.Tensor.exponential_,
}


class MemberGenerators:
    """One member's training streams: a CPU generator and one per accelerator device, seeded as
    ``torch.manual_seed(rank_seed(seed, 0))`` seeds a single run's default generators."""

    def __init__(self, seed: int, rank: int = 0) -> None:
        self.seed = int(seed)
        self.stream_seed = rank_seed(seed, rank)
        self._generators: dict[str, torch.Generator] = {}

    def for_device(self, device: torch.device) -> torch.Generator:
        key = str(device) if device.type != "cpu" else "cpu"
        if key not in self._generators:
            generator = torch.Generator(device=device)
            generator.manual_seed(self.stream_seed)
            self._generators[key] = generator
        return self._generators[key]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {key: gen.get_state() for key, gen in self._generators.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for key, value in state.items():
            self.for_device(torch.device(key)).set_state(value)

    def single_run_stream(self) -> tuple[Any, ...]:
        """This stream as ``callbacks.randomness.capture_rng`` returns a single run's: what the
        member's ``last.ckpt`` stores for ``TrainingRandomness`` (numpy and python are untouched
        by these models' training steps, so they sit where seeding left them)."""
        import random

        cpu = self.for_device(torch.device("cpu")).get_state()
        np_state = np.random.RandomState(self.stream_seed).get_state()
        py_state = random.Random(self.stream_seed).getstate()
        cuda = [g.get_state() for key, g in sorted(self._generators.items()) if key != "cpu"]
        return cpu, np_state, py_state, cuda or None


def _shape(args: tuple, kwargs: dict) -> tuple[int, ...]:
    size = kwargs.get("size", args)
    if len(size) == 1 and isinstance(size[0], tuple | list | torch.Size):
        size = size[0]
    return tuple(int(s) for s in size)


class MemberNoise(TorchFunctionMode):
    """Answer ``randn_like``/``rand_like``/``randn``/``rand`` from the members' own generators.

    With ``member=None`` (inside ``vmap`` over the member dimension; ``vmap(...,
    randomness="same")``, so that drawing with an explicit generator is allowed) every
    member draws its share and the stack is returned as the batched result; with ``member=k``
    (the per-member loop) member k draws alone. ``active`` masks nothing: a dropped member still
    draws, so no member's stream depends on another's fate.
    """

    def __init__(self, generators: list[MemberGenerators], member: int | None = None) -> None:
        super().__init__()
        self.generators = generators
        self.member = member

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = dict(kwargs or {})
        if func in _LIKE:
            like = args[0]
            draw = _LIKE[func]
            shape = tuple(like.shape)
            dtype = kwargs.get("dtype") or like.dtype
            device = torch.device(kwargs.get("device") or like.device)
        elif func in _FACTORY:
            draw = func
            shape = _shape(args, kwargs)
            dtype = kwargs.get("dtype") or torch.get_default_dtype()
            device = torch.device(kwargs.get("device") or "cpu")
            if kwargs.get("generator") is not None:
                return func(*args, **kwargs)
        elif func in _REFUSED:
            raise LatentzooError(
                f"ensemble: the model draws with {getattr(func, '__name__', func)}, which has no "
                "per-member stream yet; train this model with single runs"
            )
        else:
            return func(*args, **kwargs)
        if self.member is not None:
            gen = self.generators[self.member].for_device(device)
            return draw(shape, generator=gen, dtype=dtype, device=device)
        draws = [
            draw(shape, generator=g.for_device(device), dtype=dtype, device=device)
            for g in self.generators
        ]
        stacked = torch.stack(draws)
        level = maybe_current_level()
        return stacked if level is None else _add_batch_dim(stacked, 0, level)
