"""Prefetching training loaders (data.resumable, ``prefetch``): a background thread renders the
next batches, and the loader still yields exactly the batches of the synchronous loader, in
the same order, across epochs, and resumes at the batches it handed out (not those it fetched)."""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import pytest
import torch
from hydra.utils import instantiate

from latentzoo.data.resumable import ResumableLoader, resumable_loader
from latentzoo.utils.distributed import resolve_batch_size
from tests.conftest import compose_config
from tests.data.test_resumable_loaders import SMALL, _equal, _take

SETS = {
    "proc_dsprites": SMALL["proc_dsprites"],
    "proc_shapes3d": ["data.dataset.size=small", "data.val_size=32", "data.test_size=32"],
    "proc_digits": ["data.val_size=100", "data.cache=true"],
    "proc_dsprites_seq": SMALL["proc_dsprites_seq"],
    "proc_shapes3d_seq": [
        "data.source.dataset.size=small",
        "data.seq_len=2",
        "data.epoch_size=40",
        "data.val_per_k=4",
    ],
    "proc_digits_seq": ["data.epoch_size=40", "data.val_per_k=4"],
}


def _loader(name: str, prefetch: int) -> ResumableLoader:
    overrides = [f"data={name}", "data.batch_size=4", f"data.prefetch={prefetch}"]
    cfg = compose_config("train", [*overrides, *SETS[name]])
    dm = instantiate(resolve_batch_size(cfg.data, 1))
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert isinstance(loader, ResumableLoader)
    return loader


def _epochs(loader: ResumableLoader, n_first: int, n_second: int) -> list[Any]:
    loader.sampler.set_epoch(0)
    first = _take(iter(loader), n_first)
    loader.sampler.set_epoch(1)
    return first + _take(iter(loader), n_second)


SLOW = {"proc_digits", "proc_shapes3d_seq"}  # > 10 s on a shared 2-core CPU


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in SETS]
)
def test_prefetching_loader_yields_the_synchronous_batches_and_resumes(name: str) -> None:
    sync, ahead = _loader(name, 0), _loader(name, 3)
    assert not sync.prefetches and ahead.prefetches
    n = min(len(sync), 6)
    # a whole short pass at the end of epoch 0 (resumed near the end), then epoch 1
    for loader in (sync, ahead):
        loader.load_state_dict({"epoch": 0, "consumed": len(sync) - n})
    expected = _epochs(sync, n, 3)
    assert _equal(_epochs(ahead, n, 3), expected)

    # state after k batches counts what was handed out, not what the thread fetched ahead
    fresh = _loader(name, 3)
    fresh.load_state_dict({"epoch": 0, "consumed": len(sync) - n})
    fresh.sampler.set_epoch(0)
    it = iter(fresh)
    _take(it, 2)
    state = fresh.state_dict()
    assert state == {"epoch": 0, "consumed": len(sync) - n + 2}
    resumed = _loader(name, 3)
    resumed.load_state_dict(state)
    resumed.sampler.set_epoch(0)
    assert _equal(_take(iter(resumed), n - 2), expected[2:n])


class _Noisy(torch.utils.data.Dataset):
    """Items with a random part: the loader must keep it synchronous and seeded."""

    def __len__(self) -> int:
        return 16

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.rand(()) + i


class _Broken(_Noisy):
    draws_random = False

    def __getitem__(self, i: int) -> torch.Tensor:
        if i == 7:
            raise RuntimeError("cannot render item 7")
        return torch.tensor(float(i))


def test_a_dataset_that_draws_random_numbers_is_not_prefetched() -> None:
    loader = resumable_loader(_Noisy(), 4, seed=0, prefetch=2)
    assert not loader.prefetches
    torch.manual_seed(1)
    first = _take(iter(loader), 2)
    torch.manual_seed(2)
    again = _take(iter(resumable_loader(_Noisy(), 4, seed=0, prefetch=2)), 2)
    assert _equal(first, again)  # per-batch seeding still applies


def test_an_error_in_the_prefetch_thread_reaches_the_training_loop_and_stops_the_thread() -> None:
    loader = resumable_loader(_Broken(), 4, seed=0, shuffle=False, prefetch=2)
    assert loader.prefetches
    before = threading.active_count()
    with pytest.raises(RuntimeError, match="item 7"):
        list(loader)
    assert threading.active_count() == before


def test_a_pass_left_early_stops_its_thread() -> None:
    loader = resumable_loader(_Broken(), 2, seed=0, shuffle=False, prefetch=1)
    before = threading.active_count()
    it = iter(loader)
    assert float(next(it)[0]) == 0.0
    it.close()  # what happens to a generator Lightning drops at max_steps
    assert threading.active_count() == before
    assert np.isclose(float(next(iter(loader))[0]), 0.0)  # the next pass starts a new thread
