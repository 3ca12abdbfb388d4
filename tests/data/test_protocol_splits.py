"""Honest protocols for every non-sequence datamodule: validation never holds a test item, and
the run seed (or an explicit ``data.seed``) drives the training batches."""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from latentzoo.data import GroundTruthDataModule
from latentzoo.data.datasets import ProcDSprites
from latentzoo.data.datasets.proc_digits import ProcDigitsDataModule
from latentzoo.data.images import ProcBlobsDataModule
from latentzoo.data.labelled import (
    ImageNet32DataModule,
    ProcCIFARDataModule,
    SklearnDigitsDataModule,
    TorchvisionDataModule,
)
from latentzoo.data.multishapes import CLEVRERFramesDataModule, ProcMultiShapesDataModule
from tests.data.test_labelled import _cifar, _mnist
from tests.data.test_labelled import no_md5 as _no_md5


@pytest.fixture(autouse=True)
def no_md5(monkeypatch: pytest.MonkeyPatch) -> None:
    _no_md5.__wrapped__(monkeypatch)  # type: ignore[attr-defined]


def _keys(loader, max_batches: int = 32) -> set[str]:
    """One fingerprint per item of the first ``max_batches`` batches (every split here but
    proc_digits' 10k test digits is smaller): its image bytes and label."""
    keys = []
    for images, labels in itertools.islice(loader, max_batches):
        for image, label in zip(images, labels, strict=True):
            data = image.numpy().tobytes() + label.numpy().tobytes()
            keys.append(hashlib.sha1(data).hexdigest())
    return set(keys)


def _ground_truth(tmp_path: Path, **kw) -> GroundTruthDataModule:
    data = ProcDSprites(size="small")
    return GroundTruthDataModule(data, (1, 64, 64), val_size=64, test_size=64, **kw)


def _mnist_dm(tmp_path: Path, **kw) -> TorchvisionDataModule:
    if not (tmp_path / "MNIST").exists():
        _mnist(tmp_path, n_train=60, n_test=20)
    return TorchvisionDataModule(root=str(tmp_path), dataset="mnist", val_size=10, **kw)


def _cifar_dm(tmp_path: Path, **kw) -> TorchvisionDataModule:
    if not (tmp_path / "cifar-10-batches-py").exists():
        files = {f"data_batch_{i}": 12 for i in range(1, 6)} | {"test_batch": 30}
        _cifar(tmp_path, "cifar-10-batches-py", files, "labels", 10)
    return TorchvisionDataModule(root=str(tmp_path), dataset="cifar10", **{"val_size": 10, **kw})


def _imagenet32(tmp_path: Path, **kw) -> ImageNet32DataModule:
    rng = np.random.default_rng(0)
    for name, n in (("train_data_batch_1", 40), ("val_data", 20)):
        if not (tmp_path / f"{name}.npz").exists():
            data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
            np.savez(tmp_path / f"{name}.npz", data=data, labels=np.arange(n) % 1000 + 1)
    return ImageNet32DataModule(root=str(tmp_path), train_batches=1, val_size=10, **kw)


def _clevrer(tmp_path: Path, **kw) -> CLEVRERFramesDataModule:
    path = tmp_path / "frames.npy"
    if not path.exists():
        frames = np.random.default_rng(0).integers(0, 256, (100, 8, 8, 3), dtype=np.uint8)
        np.save(path, frames)
    return CLEVRERFramesDataModule(path=str(path), image_size=8, val_fraction=0.1, **kw)


DATAMODULES: dict[str, Callable[..., object]] = {
    "ground_truth": _ground_truth,
    "mnist": _mnist_dm,
    "cifar10": _cifar_dm,
    "imagenet32": _imagenet32,
    "sk_digits": lambda tmp_path, **kw: SklearnDigitsDataModule(**kw),
    "proc_cifar": lambda tmp_path, **kw: ProcCIFARDataModule(
        num_train=60, num_test=30, val_size=10, **kw
    ),
    "proc_digits": lambda tmp_path, **kw: ProcDigitsDataModule(val_size=64, **kw),
    "proc_multishapes": lambda tmp_path, **kw: ProcMultiShapesDataModule(
        image_size=64, num_train=48, num_val=16, num_test=16, **kw
    ),
    "clevrer": _clevrer,
    "proc_blobs": lambda tmp_path, **kw: ProcBlobsDataModule(
        image_size=8, num_train=48, num_val=16, num_test=16, **kw
    ),
}


@pytest.mark.parametrize("name", sorted(DATAMODULES))
def test_validation_never_holds_test_items(name: str, tmp_path: Path) -> None:
    dm = DATAMODULES[name](tmp_path, batch_size=8)
    dm.setup("fit")
    val, test = _keys(dm.val_dataloader()), _keys(dm.test_dataloader())
    assert val and test
    assert val.isdisjoint(test)


def _first_batch(name: str, tmp_path: Path, monkeypatch, run_seed: int, **kw) -> torch.Tensor:
    monkeypatch.setenv("PL_GLOBAL_SEED", str(run_seed))  # what seed_everything(run_seed) sets
    dm = DATAMODULES[name](tmp_path, batch_size=8, **kw)
    dm.setup("fit")
    images, labels = next(iter(dm.train_dataloader()))
    return torch.cat([images.flatten(1), labels.view(len(labels), -1).float()], 1)


@pytest.mark.parametrize("name", sorted(DATAMODULES))
def test_the_run_seed_drives_the_training_batches(name: str, tmp_path: Path, monkeypatch) -> None:
    one = _first_batch(name, tmp_path, monkeypatch, 1)
    assert torch.equal(one, _first_batch(name, tmp_path, monkeypatch, 1))
    assert not torch.equal(one, _first_batch(name, tmp_path, monkeypatch, 2))
    # an explicit data.seed wins over the run seed
    fixed = _first_batch(name, tmp_path, monkeypatch, 1, seed=7)
    assert torch.equal(fixed, _first_batch(name, tmp_path, monkeypatch, 2, seed=7))
    assert not torch.equal(fixed, one)


def test_labelled_validation_is_carved_from_train(tmp_path: Path) -> None:
    dm = _cifar_dm(tmp_path, batch_size=8)
    dm.setup("fit")
    train, val = dm.datasets["train"].indices, dm.datasets["val"].indices
    assert len(val) == 10 and len(train) == 50 and set(train.tolist()).isdisjoint(val.tolist())
    assert dm.datasets["val"].source is dm.datasets["train"].source  # the train images
    other = _cifar_dm(tmp_path, batch_size=8, split_seed=1)
    other.setup("fit")
    assert not torch.equal(other.datasets["val"].indices, val)
    full = _cifar_dm(tmp_path, batch_size=8, val_size=0)  # the papers' protocol: all of train
    full.setup("fit")
    assert len(full.datasets["train"]) == 60


def test_no_validation_protocol_trains_on_everything() -> None:
    data = ProcDSprites(size="small")
    dm = GroundTruthDataModule(data, (1, 64, 64), batch_size=16, val_size=0, test_size=0)
    assert len(dm.splits["train"]) == len(data)
    assert len(dm.splits["val"]) == 16  # preview images for the grids only
