"""Training loaders that resume exactly (DESIGN.md, "Contracts at scale": checkpoints, seeds).

A training loader built by :func:`resumable_loader` is a :class:`ResumableLoader`:

- **Order.** Its sampler (:class:`ResumableBatchSampler`) draws epoch ``e``'s order from
  ``(run seed, e)`` alone (``PL_GLOBAL_SEED``, which ``seed_everything`` sets), never from the
  global RNG; under DDP every rank takes its own strided share of that order (like
  ``DistributedSampler``, which it subclasses so that Lightning does not wrap it), in batches.
- **Position.** ``state_dict()`` is ``{"epoch", "consumed"}``: the batches this loader has handed
  out in the current epoch. Lightning saves it with the fit loop (``loops.fit_loop.state_dict.
  combined_loader``) and calls ``load_state_dict`` before it creates the iterator on resume; the
  next pass then starts at batch ``consumed`` of epoch ``epoch`` (or at the next epoch's start
  when the epoch was complete). Lightning does not prefetch from sized loaders, so "handed out"
  is "trained on".
- **Randomness of a batch** (random flips, augmentations, a latent's ε): the dataset is read and
  collated under a torch/numpy/python RNG seeded by ``(run seed, epoch, rank, batch number)``
  (:class:`BatchFetch`), in the main process or a worker alike. A batch is thus the same
  whatever ``num_workers`` is, whether the run was resumed, and whatever else drew random
  numbers in between; worker processes hold no RNG state that a resume would lose.

Samplers that already yield whole batches (``sequences.TrainSequenceSampler``) implement the
same ``epoch``/``resume`` protocol (:class:`ResumableSampler`) and use :class:`ResumableLoader`
directly.

**Prefetch** (``prefetch=n`` with ``num_workers=0``): in-process renderers (proc_dsprites,
proc_shapes3d, proc_digits, the sequence sets) fetch the next ``n`` batches in a background
thread while the model trains on the current one, so rendering leaves the critical path without
worker processes. The thread runs exactly the synchronous pass (same sampler, same fetch), so
the batches and their order are those of ``prefetch=0``; batches fetched but not yet handed out
are not counted in ``state_dict`` and are fetched again after a resume. It is used only when the
fetch draws no random numbers (a dataset declares ``draws_random = False``), because the
per-batch seeding of :class:`BatchFetch` sets the process-global RNGs, which the training
thread uses at the same time; otherwise the loader stays synchronous.
"""

from __future__ import annotations

import contextlib
import os
import queue
import random
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

__all__ = [
    "BatchFetch",
    "ResumableBatchSampler",
    "ResumableLoader",
    "ResumableSampler",
    "SeededBatch",
    "batch_seed",
    "draws_random",
    "resumable_loader",
    "run_seed",
    "seeded_rng",
]


def run_seed() -> int:
    """The run seed (``seed_everything`` exports it as ``PL_GLOBAL_SEED``); 0 when unseeded."""
    return int(os.environ.get("PL_GLOBAL_SEED", 0))


def rank_and_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def batch_seed(seed: int, epoch: int, rank: int, index: int) -> int:
    """A 32-bit seed for batch ``index`` of ``epoch`` on ``rank`` (numpy SeedSequence mixing)."""
    words = [int(seed), int(epoch), int(rank), int(index)]
    return int(np.random.SeedSequence(words).generate_state(1)[0])


@contextlib.contextmanager
def seeded_rng(seed: int) -> Iterator[None]:
    """Run the body with torch (CPU), numpy and python RNGs seeded by ``seed``; restore after."""
    torch_state = torch.get_rng_state()
    np_state = np.random.get_state()
    py_state = random.getstate()
    torch.default_generator.manual_seed(seed)  # CPU only: workers must not touch CUDA
    np.random.seed(seed)
    random.seed(seed)
    try:
        yield
    finally:
        torch.set_rng_state(torch_state)
        np.random.set_state(np_state)
        random.setstate(py_state)


def draws_random(dataset: Any) -> bool:
    """Whether reading ``dataset`` may draw from the global RNGs: True unless it (or the dataset
    it wraps, through ``.dataset`` of subsets and batch fetchers) declares ``draws_random = False``.
    """
    while dataset is not None:
        declared = getattr(type(dataset), "draws_random", None)
        if isinstance(declared, bool):
            return declared
        dataset = getattr(dataset, "dataset", None)
    return True


class SeededBatch(list):
    """The indices of one batch, carrying the seed of the batch's randomness."""

    def __init__(self, indices: Sequence[int], seed: int) -> None:
        super().__init__(indices)
        self.seed = int(seed)

    def __reduce__(self) -> tuple[Any, ...]:  # keep the seed when sent to a worker
        return (SeededBatch, (list(self), self.seed))


class BatchFetch(Dataset):
    """Map-style dataset indexed by a :class:`SeededBatch`: reads and collates the whole batch
    under :func:`seeded_rng` (use with ``DataLoader(batch_size=None, collate_fn=identity)``)."""

    def __init__(self, dataset: Dataset, collate_fn: Callable[[Any], Any]) -> None:
        self.dataset = dataset
        self.collate_fn = collate_fn
        # a dataset that draws no random numbers needs no seeding (and may run in a thread)
        self.seeded = draws_random(dataset)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, batch: SeededBatch) -> Any:
        with seeded_rng(batch.seed) if self.seeded else contextlib.nullcontext():
            getitems = getattr(self.dataset, "__getitems__", None)
            items = getitems(list(batch)) if getitems else [self.dataset[i] for i in batch]
            return self.collate_fn(items)


class ResumableSampler(DistributedSampler):
    """Base of samplers that yield whole batches and resume at a batch of an epoch.

    A ``DistributedSampler`` subclass so that Lightning leaves it alone under DDP: it shards by
    rank itself. Subclasses implement ``_batches(epoch, rank, world)`` (all of this rank's
    batches of ``epoch``) and ``__len__`` (batches per rank).
    """

    def __init__(self, shuffle: bool = True) -> None:  # no super().__init__: ranks resolve late
        self.shuffle = shuffle
        self.epoch = 0
        self.start = 0  # first batch of the next pass (a resumed position)
        # True: this stream ignores the process group (an ensemble member trains on one
        # device even when the ensemble's members are spread over DDP ranks)
        self.single_process = False

    def rank_and_world(self) -> tuple[int, int]:
        return (0, 1) if self.single_process else rank_and_world()

    def set_epoch(self, epoch: int) -> None:
        if int(epoch) != self.epoch:
            self.epoch, self.start = int(epoch), 0

    def resume(self, epoch: int, consumed: int) -> None:
        """Make the next pass start after ``consumed`` batches of ``epoch``."""
        if consumed >= len(self):
            self.epoch, self.start = int(epoch) + 1, 0
        else:
            self.epoch, self.start = int(epoch), int(consumed)

    def _batches(self, epoch: int, rank: int, world: int) -> Iterator[Any]:
        raise NotImplementedError

    def __iter__(self) -> Iterator[Any]:
        epoch, start = self.epoch, self.start
        # a pass without a set_epoch() call in between (plain loops) moves on to the next epoch
        self.epoch, self.start = epoch + 1, 0
        rank, world = self.rank_and_world()
        for i, batch in enumerate(self._batches(epoch, rank, world)):
            if i >= start:
                yield batch

    def pass_start(self) -> tuple[int, int]:
        """``(epoch, start)`` of the pass that the next ``iter()`` begins."""
        return self.epoch, self.start


class ResumableBatchSampler(ResumableSampler):
    """Batches of indices into a dataset of ``size`` items; epoch ``e``'s order from
    ``(seed, e)``, rank ``r`` of ``w`` taking positions ``r, r + w, ...`` of it (the order is
    padded by wrapping, like ``DistributedSampler``, so that every rank has as many items)."""

    def __init__(
        self,
        size: int,
        batch_size: int,
        shuffle: bool = True,
        drop_last: bool = True,
        seed: int | None = None,
    ) -> None:
        super().__init__(shuffle)
        self.size = int(size)
        self.batch_size = int(batch_size)
        self.drop_last = drop_last
        self.seed = run_seed() if seed is None else int(seed)

    def _per_rank(self, world: int) -> int:
        return -(-self.size // world)

    def __len__(self) -> int:
        n = self._per_rank(self.rank_and_world()[1])
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _batches(self, epoch: int, rank: int, world: int) -> Iterator[SeededBatch]:
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(self.size)
        else:
            order = np.arange(self.size)
        per_rank = self._per_rank(world)
        if per_rank * world > self.size:
            order = np.resize(order, per_rank * world)  # wraps around
        mine = order[rank::world]
        for b in range(len(self)):
            indices = mine[b * self.batch_size : (b + 1) * self.batch_size].tolist()
            yield SeededBatch(indices, batch_seed(self.seed, epoch, rank, b))


def _identity(batch: Any) -> Any:
    return batch


_DONE = object()  # end of a prefetched pass


class _Prefetcher:
    """Runs ``batches`` (an iterator) in a daemon thread, at most ``depth`` batches ahead."""

    def __init__(self, batches: Iterator[Any], depth: int) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(batches,), name="latentzoo-prefetch", daemon=True
        )
        self._thread.start()

    def _run(self, batches: Iterator[Any]) -> None:
        try:
            for batch in batches:
                if not self._put(batch):
                    return
            self._put(_DONE)
        except BaseException as error:  # handed to the training thread, raised there
            self._put(error)

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> Iterator[Any]:
        try:
            while True:
                item = self._queue.get()
                if item is _DONE:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self.close()

    def close(self) -> None:
        """Stop the thread (a pass left early: max_steps, an exception, a new epoch)."""
        self._stop.set()
        self._thread.join()


class ResumableLoader(DataLoader):
    """A DataLoader over a :class:`ResumableSampler` (``batch_size=None``) whose position in the
    epoch is its ``state_dict`` (Lightning saves and restores it with the fit loop).

    ``prefetch``: batches fetched ahead in a background thread when ``num_workers=0`` and the
    fetch draws no random numbers (see the module docstring); 0 fetches synchronously.
    """

    def __init__(self, *args: Any, prefetch: int = 0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(self.sampler, ResumableSampler):
            raise TypeError("ResumableLoader needs a ResumableSampler as its sampler")
        if prefetch < 0:
            raise ValueError(f"prefetch must be >= 0 batches, got {prefetch}")
        self.prefetch = int(prefetch)
        self._position = self.sampler.pass_start()  # (epoch, batches handed out)

    @property
    def prefetches(self) -> bool:
        """Whether passes run in a background thread (see ``prefetch``)."""
        return self.prefetch > 0 and self.num_workers == 0 and not draws_random(self.dataset)

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        # A generator: nothing runs before the first next(). The prefetch thread then reads the
        # sampler's position while this thread waits for the first batch, so no set_epoch or
        # load_state_dict can come in between.
        epoch, start = self.sampler.pass_start()
        self._position = (epoch, start)
        batches = super().__iter__()
        if self.prefetches:
            batches = iter(_Prefetcher(batches, self.prefetch))
        try:
            for i, batch in enumerate(batches, start=start + 1):
                self._position = (epoch, i)
                yield batch
        finally:  # a pass left early stops its prefetch thread now, not at garbage collection
            close = getattr(batches, "close", None)
            if close is not None:
                close()

    def state_dict(self) -> dict[str, int]:
        epoch, consumed = self._position
        return {"epoch": int(epoch), "consumed": int(consumed)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.sampler.resume(int(state["epoch"]), int(state["consumed"]))
        self._position = self.sampler.pass_start()


def resumable_loader(
    dataset: Dataset,
    batch_size: int,
    collate_fn: Callable[[Any], Any] | None = None,
    shuffle: bool = True,
    drop_last: bool = True,
    seed: int | None = None,
    prefetch: int = 0,
    **loader_kwargs: Any,
) -> ResumableLoader:
    """The training loader of ``dataset``: seeded order, seeded per-batch randomness, resumable.

    ``collate_fn`` (default: torch's ``default_collate``) receives the batch's list of items
    (or what the dataset's ``__getitems__`` returns) as usual; ``loader_kwargs`` go to the
    DataLoader (``num_workers``, ``pin_memory``, ``persistent_workers``, ...); ``prefetch``
    batches are fetched ahead in a thread (see :class:`ResumableLoader`).
    """
    from torch.utils.data import default_collate

    sampler = ResumableBatchSampler(len(dataset), batch_size, shuffle, drop_last, seed)  # type: ignore[arg-type]
    return ResumableLoader(
        BatchFetch(dataset, collate_fn or default_collate),
        sampler=sampler,
        batch_size=None,
        collate_fn=_identity,
        prefetch=prefetch,
        **loader_kwargs,
    )
