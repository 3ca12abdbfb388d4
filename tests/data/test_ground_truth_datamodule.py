"""GroundTruthDataModule: seeded disjoint splits and whole-batch fetching that agrees with the
dataset's own per-item access."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from latentzoo.data import GroundTruthDataModule
from latentzoo.data.datasets import ProcDSprites


@pytest.fixture(scope="module")
def dataset() -> ProcDSprites:
    return ProcDSprites(size="small")


def make(dataset, **kwargs) -> GroundTruthDataModule:
    args = {"image_shape": (1, 64, 64), "batch_size": 16, "val_size": 100, "test_size": 50}
    return GroundTruthDataModule(dataset, **{**args, **kwargs})


def test_splits_are_disjoint_complete_and_seeded(dataset) -> None:
    dm = make(dataset)
    sizes = {name: len(idx) for name, idx in dm.splits.items()}
    assert sizes == {"val": 100, "test": 50, "train": len(dataset) - 150}
    joined = np.concatenate(list(dm.splits.values()))
    assert len(np.unique(joined)) == len(dataset)
    again, other = make(dataset), make(dataset, split_seed=1)
    assert all(np.array_equal(dm.splits[k], again.splits[k]) for k in dm.splits)
    assert not np.array_equal(dm.splits["val"], other.splits["val"])


def test_batches_match_per_item_access(dataset) -> None:
    dm = make(dataset)
    images, factors = next(iter(dm.val_dataloader()))
    assert images.shape == (16, 1, 64, 64) and images.dtype == torch.float32
    assert factors.shape == (16, 6) and factors.dtype == torch.int64
    expected = dm.splits["val"][:16]
    np.testing.assert_array_equal(factors.numpy(), dataset.factors_of(expected))
    image_5, factors_5 = dataset[int(expected[5])]
    assert torch.equal(images[5], image_5) and torch.equal(factors[5], factors_5)


def test_train_loader_shuffles_and_drops_last(dataset) -> None:
    dm = make(dataset)
    loader = dm.train_dataloader()
    assert len(loader) == (len(dataset) - 150) // 16
    first = next(iter(loader))[1]
    assert not torch.equal(first, torch.as_tensor(dataset.factors_of(dm.splits["train"][:16])))


def test_rejects_mismatched_shape_and_oversized_splits(dataset) -> None:
    with pytest.raises(ValueError, match="does not match"):
        make(dataset, image_shape=(3, 64, 64))
    with pytest.raises(ValueError, match="smaller than the dataset"):
        make(dataset, val_size=len(dataset))
