"""proc_digits, the procedural MNIST stand-in: shapes, determinism, balance, digit-likeness."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from latentzoo.data.datasets import ProcDigits, ProcDigitsDataModule
from latentzoo.data.datasets.proc_digits import glyph_segments


def test_shapes_dtypes_range() -> None:
    ds = ProcDigits("train", seed=0)
    assert len(ds) == 60_000 and len(ProcDigits("test")) == 10_000
    images, labels = ds.get_batch(np.arange(40))
    assert images.shape == (40, 1, 28, 28) and images.dtype == torch.float32
    assert labels.dtype == torch.int64 and labels.tolist() == [i % 10 for i in range(40)]
    assert images.min() == 0.0 and images.max() == 1.0
    # antialiased: intermediate grey levels exist, and every digit has ink but not too much
    assert ((images > 0) & (images < 1)).float().mean() > 0.01
    ink = images.mean(dim=(1, 2, 3))
    assert ink.min() > 0.03 and ink.max() < 0.4
    # the border rows/columns stay mostly empty (glyphs are centred, at most 21 px tall)
    assert images[:, :, [0, -1], :].mean() < 0.01 and images[:, :, :, [0, -1]].mean() < 0.01
    image, label = ds[7]
    assert image.shape == (1, 28, 28) and int(label) == 7
    with pytest.raises(IndexError):
        ds.get_batch(np.array([60_000]))
    with pytest.raises(ValueError, match="split"):
        ProcDigits("val")


def test_deterministic_per_seed_and_index() -> None:
    a = ProcDigits("train", seed=3)
    b = ProcDigits("train", seed=3)
    idx = np.array([5, 59_999, 123, 5, 40_000])
    batch = a.images_u8_of(idx)
    # the same bytes from a new instance, alone, or inside a different batch
    assert torch.equal(batch, b.images_u8_of(idx))
    assert torch.equal(batch[1], b.images_u8_of(np.array([59_999]))[0])
    assert torch.equal(batch[0], batch[3])
    mixed = b.images_u8_of(np.concatenate([np.arange(600, 1200), idx]))  # > one render chunk
    assert torch.equal(mixed[-5:], batch)
    # another seed, and the test split, are different digits
    assert not torch.equal(batch, ProcDigits("train", seed=4).images_u8_of(idx))
    cached = ProcDigits("train", seed=3, cache=True)
    assert torch.equal(cached.images_u8_of(idx[:3]), batch[:3])  # renders and stores
    assert torch.equal(cached.images_u8_of(idx), batch)  # gathers the stored ones
    assert int(cached._done.sum()) == 4
    test = ProcDigits("test", seed=3).images_u8_of(np.arange(5))
    assert not torch.equal(test, a.images_u8_of(np.arange(5)))


def test_class_balance_and_fixed_split() -> None:
    for split, n in (("train", 6000), ("test", 1000)):
        counts = np.bincount(ProcDigits(split).labels, minlength=10)
        assert counts.tolist() == [n] * 10
    segments, valid = glyph_segments()
    assert segments.shape[0] == 10 and valid.sum(1).min() >= 2
    assert segments[valid].min() >= 0.0 and segments[valid].max() <= 1.0


def test_digits_are_recognisable_by_class_means() -> None:
    """A nearest-class-mean classifier fit on train digits classifies test digits well."""
    x, y = ProcDigits("train").get_batch(np.arange(500))
    xt, yt = ProcDigits("test").get_batch(np.arange(200))
    means = torch.stack([x[y == c].mean(0) for c in range(10)]).reshape(10, -1)
    pred = torch.cdist(xt.reshape(len(xt), -1), means).argmin(1)
    assert (pred == yt).float().mean() > 0.8
    # and the ten class means are all clearly different
    dist = torch.cdist(means, means) + torch.eye(10) * 1e9
    assert dist.min() > 1.0


def test_dataloader_and_datamodule() -> None:
    loader = DataLoader(ProcDigits("test"), batch_size=16)  # __getitems__ + default collate
    images, labels = next(iter(loader))
    assert images.shape == (16, 1, 28, 28) and labels.tolist() == [i % 10 for i in range(16)]
    dm = ProcDigitsDataModule(val_size=100, batch_size=8)
    assert set(dm.splits["val"]).isdisjoint(dm.splits["train"])
    assert len(dm.splits["train"]) == 59_900 and dm.num_classes == 10
    images, labels = next(iter(dm.val_dataloader()))
    assert images.shape == (8, 1, 28, 28) and labels.dtype == torch.int64
    with pytest.raises(ValueError, match="proc_digits images"):
        ProcDigitsDataModule(image_shape=(3, 28, 28))
