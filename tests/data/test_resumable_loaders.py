"""Every training loader resumes at its position: ``state_dict()`` after k batches, loaded into
a new loader, gives the batches the original gives next (data.resumable; exact resume)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from hydra.utils import instantiate

from latentzoo.data.resumable import ResumableLoader
from latentzoo.utils.distributed import resolve_batch_size
from tests.conftest import compose_config

SMALL = {
    "proc_dsprites": ["data.dataset.size=small", "data.val_size=32", "data.test_size=32"],
    "proc_dsprites_seq": [
        "data.source.dataset.size=small",
        "data.seq_len=2",
        "data.epoch_size=40",
        "data.val_per_k=4",
    ],
    "proc_blobs": ["data.image_size=16", "data.num_train=40", "data.num_val=8", "data.num_test=8"],
    "proc_multishapes": ["data.image_size=64", "data.num_train=40", "data.num_val=8"],
    "sk_digits": ["data.augment=nfpi_mnist"],
    "proc_digits": ["data.val_size=100", "data.cache=false"],
}


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def _datamodule(name: str, tmp_path: Path, workers: int = 0) -> Any:
    overrides = [f"data={name}", "data.batch_size=4", f"data.num_workers={workers}"]
    cfg = compose_config("train", [*overrides, *SMALL.get(name, [])])
    dm = instantiate(resolve_batch_size(cfg.data, 1))
    dm.setup("fit")
    return dm


def _latents_datamodule(tmp_path: Path, workers: int = 0) -> Any:
    from latentzoo.cache_latents import cache_latents
    from latentzoo.data.latents import LatentsDataModule
    from latentzoo.models.autoencoders import IdentityFirstStage
    from tests.test_cache_latents import tiny_images

    cache_latents(tiny_images(40), IdentityFirstStage(3), tmp_path, [3, 8, 8], num_classes=3)
    dm = LatentsDataModule(
        str(tmp_path), [3, 8, 8], num_classes=3, batch_size=4, val_size=8, num_workers=workers
    )
    dm.setup("fit")
    return dm


def _make(name: str, tmp_path: Path, workers: int = 0) -> Any:
    return (
        _latents_datamodule(tmp_path, workers)
        if name == "latents"
        else _datamodule(name, tmp_path, workers)
    )


def _take(iterator: Any, n: int) -> list[Any]:
    return [next(iterator) for _ in range(n)]


NAMES = [*SMALL, "latents"]


@pytest.mark.parametrize("name", NAMES)
def test_train_loader_resumes_mid_epoch_and_across_epochs(name: str, tmp_path: Path) -> None:
    dm = _make(name, tmp_path)
    loader = dm.train_dataloader()
    assert isinstance(loader, ResumableLoader)
    n = len(loader)
    assert n >= 4, n
    k = 2
    # epoch 0 (set_epoch as Lightning does): k batches, then the state, then the rest
    loader.sampler.set_epoch(0)
    it = iter(loader)
    _take(it, k)
    state = loader.state_dict()
    assert state == {"epoch": 0, "consumed": k}
    rest = _take(it, 3)
    loader.sampler.set_epoch(1)
    epoch1 = _take(iter(loader), 2)
    assert not _equal(epoch1, rest[:2]), "epochs must differ"

    fresh = dm.train_dataloader()
    fresh.load_state_dict(state)
    fresh.sampler.set_epoch(0)  # Lightning calls it again on resume: must keep the position
    assert _equal(_take(iter(fresh), 3), rest)
    fresh.sampler.set_epoch(1)
    assert _equal(_take(iter(fresh), 2), epoch1)

    # a state saved at the end of an epoch resumes at the start of the next one
    end = dm.train_dataloader()
    end.load_state_dict({"epoch": 0, "consumed": n})
    assert _equal(_take(iter(end), 2), epoch1)


@pytest.mark.parametrize("name", ["proc_blobs", "sk_digits", "latents"])
def test_random_augmentations_do_not_depend_on_workers_or_the_global_rng(
    name: str, tmp_path: Path
) -> None:
    """Flips, augmentations and latent noise come from (seed, epoch, rank, batch): the same
    batches with 0 or 2 workers, whatever the global RNG was, and different across epochs."""
    single = _make(name, tmp_path / "a").train_dataloader()
    torch.manual_seed(123)
    expected = _take(iter(single), 3)
    torch.manual_seed(456)
    again = _take(iter(_make(name, tmp_path / "b").train_dataloader()), 3)
    assert _equal(expected, again)
    workers = _make(name, tmp_path / "c", workers=2).train_dataloader()
    assert _equal(_take(iter(workers), 3), expected)


def test_ranks_take_disjoint_shares(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from latentzoo.data import resumable

    dm = _make("proc_blobs", tmp_path)
    seen = []
    for rank in (0, 1):
        monkeypatch.setattr(resumable, "rank_and_world", lambda r=rank: (r, 2))
        sampler = dm.train_dataloader().sampler
        seen.append([i for batch in sampler for i in batch])
    assert len(seen[0]) == len(seen[1]) == 40 // 2 // 4 * 4
    assert not set(seen[0]) & set(seen[1])
