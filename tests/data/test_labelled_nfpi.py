"""NFPI data pipelines as the release (issue 17): the MNIST crop/translation and unclamped noise
on a fixed image, the test-noise switch, the subset vs prior-fit sets, and ImageNet32 in its
published npz and pickle formats (locating, the download path and its one-line failure)."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from latentzoo.data.datasets.errors import DatasetNotFoundError
from latentzoo.data.labelled import (
    ImageNet32DataModule,
    TorchvisionDataModule,
    make_augment,
)
from tests.data.test_labelled import _cifar, _mnist, no_md5  # noqa: F401 (fixture)


def _centre_square() -> torch.Tensor:
    """MNIST-sized image after the zero Pad(2): a bright 4x4 square at the centre (rotation about
    the centre leaves it in place, so only the random crop moves it)."""
    image = torch.zeros(1, 32, 32, dtype=torch.uint8)
    image[:, 14:18, 14:18] = 255
    return image


def test_nfpi_mnist_translates_by_the_random_crop_and_adds_unclamped_noise() -> None:
    augment = make_augment("nfpi_mnist", 32)
    torch.manual_seed(0)
    shifts = set()
    for _ in range(60):
        out = augment(_centre_square())
        assert out.dtype == torch.float32 and out.shape == (1, 32, 32)
        bright = out[0] > 0.5
        rows, cols = bright.nonzero().float().mean(0).tolist()
        shifts.add((round(rows - 15.5), round(cols - 15.5)))
        background = out[0][~bright]
        assert background.min() >= 0 and background.max() < 0.05  # edge pad of zeros + noise
        assert out.max() > 1.0  # 255 + noise is not clamped to 1
        assert ((background * 255) % 1).abs().max() > 0.01  # and not rounded to 8 bits
    moves = {d for s in shifts for d in s}
    assert moves <= {-2, -1, 0, 1, 2}  # CenterCrop(36) then RandomCrop(32): up to +-2 px
    assert {-2, 2} <= moves


def test_test_noise_switch(tmp_path: Path) -> None:
    _mnist(tmp_path)
    kw = {"root": str(tmp_path), "dataset": "mnist", "pad": 2, "resolution": 32, "val_size": 6}
    clean = TorchvisionDataModule(**kw, batch_size=20)
    noisy = TorchvisionDataModule(**kw, batch_size=20, test_noise=0.05)
    x0, _ = next(iter(clean.test_dataloader()))
    torch.manual_seed(0)
    x1, _ = next(iter(noisy.test_dataloader()))
    delta = x1 - x0
    assert delta.min() >= 0 and delta.max() < 0.05 and delta.mean() > 0.02  # U(0, 0.05)
    assert x1.max() > 1.0  # not clamped
    assert torch.equal(noisy.reference_dataset("test")[0][0], clean.datasets["test"][0][0])
    with pytest.raises(ValueError, match="test_noise"):
        TorchvisionDataModule(**kw, test_noise=-1)


def _labels_of(loader) -> torch.Tensor:
    return torch.cat([y for _, y in loader])


def test_prior_fit_set_is_the_subset_by_default_or_the_whole_pool(
    tmp_path: Path,
    no_md5: None,  # noqa: F811
) -> None:
    files = {f"data_batch_{i}": 20 for i in range(1, 6)} | {"test_batch": 10}
    _cifar(tmp_path / "c10", "cifar-10-batches-py", files, "labels", 10)
    kw = {"root": str(tmp_path / "c10"), "dataset": "cifar10", "val_size": 0, "batch_size": 8}
    subset = TorchvisionDataModule(**kw, items_per_class=3, augment="nfpi_cifar")
    subset.setup()
    fit = subset.prior_fit_dataloader(augment=False)
    assert fit.dataset.indices.tolist() == subset.datasets["train"].indices.tolist()  # release
    assert len(subset.datasets["train"]) == 30
    full = TorchvisionDataModule(
        **kw, items_per_class=3, prior_fit_items_per_class=0, augment="nfpi_cifar"
    )
    full.setup()
    assert len(full.datasets["train"]) == 30  # training still on the subset
    assert len(full.prior_fit_dataloader().dataset) == 100  # the prior on every training image
    assert (
        torch.bincount(_labels_of(full.prior_fit_dataloader(augment=False))).tolist() == [10] * 10
    )
    assert set(full.datasets["train"].indices.tolist()) <= set(
        full.datasets["prior_fit"].indices.tolist()
    )
    assert full.prior_fit_dataloader(augment=True).dataset.transform is not None
    assert full.prior_fit_dataloader(augment=False).dataset.transform is None
    five = TorchvisionDataModule(**kw, items_per_class=3, prior_fit_items_per_class=5)
    five.setup()
    assert set(five.datasets["train"].indices.tolist()) <= set(
        five.datasets["prior_fit"].indices.tolist()
    )  # the same per-class draw, longer


def _imagenet_batches(folder: Path, fmt: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = {}
    for name, n in (("train_data_batch_1", 12), ("train_data_batch_2", 8), ("val_data", 6)):
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = (np.arange(n) % 1000 + 1).tolist()
        if fmt == "npz":
            np.savez(folder / f"{name}.npz", data=data, labels=labels, mean=data.mean(0))
        else:  # Imagenet32_train.zip: pickled dicts without extension
            with open(folder / name, "wb") as f:
                pickle.dump({"data": data, "labels": labels, "mean": data.mean(0)}, f)
        rows[name] = (data, np.asarray(labels))
    return rows


def test_imagenet32_pickle_batches_in_the_zip_folders(tmp_path: Path) -> None:
    train = _imagenet_batches(tmp_path / "Imagenet32_train", "pickle")
    val = {"val_data": train.pop("val_data")}
    (tmp_path / "Imagenet32_train" / "val_data").rename(tmp_path / "val_data")
    dm = ImageNet32DataModule(root=str(tmp_path), train_batches=2, val_size=0, batch_size=4)
    dm.setup()
    x, y = dm.datasets["train"][13]
    assert torch.equal(x, torch.from_numpy(train["train_data_batch_2"][0][1].reshape(3, 32, 32)))
    assert int(y) == train["train_data_batch_2"][1][1] - 1
    assert len(dm.datasets["test"]) == len(val["val_data"][1])


def test_imagenet32_download_extracts_the_npz_zips_or_fails_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = tmp_path / "server"
    _imagenet_batches(source / "npz", "npz")
    for part, names in (
        ("train", ["train_data_batch_1", "train_data_batch_2"]),
        ("val", ["val_data"]),
    ):
        with zipfile.ZipFile(source / f"Imagenet32_{part}_npz.zip", "w") as z:
            for name in names:
                z.write(source / "npz" / f"{name}.npz", f"Imagenet32_{part}_npz/{name}.npz")
    monkeypatch.setattr(
        ImageNet32DataModule, "ZIP_URL", f"file://{source}/Imagenet{{size}}_{{part}}_npz.zip"
    )
    root = tmp_path / "data"
    dm = ImageNet32DataModule(str(root), train_batches=2, download=True, val_size=0)
    dm.setup()
    assert len(dm.datasets["train"]) == 20 and (root / "Imagenet32_train_npz").is_dir()

    (source / "login.html").write_text("<html>please log in</html>")
    monkeypatch.setattr(ImageNet32DataModule, "ZIP_URL", f"file://{source}/login.html")
    html = ImageNet32DataModule(str(tmp_path / "d2"), train_batches=2, download=True)
    with pytest.raises(DatasetNotFoundError, match="did not return a zip") as info:
        html.setup()
    assert "\n" not in str(info.value)
    monkeypatch.setattr(ImageNet32DataModule, "ZIP_URL", f"file://{source}/absent.zip")
    offline = ImageNet32DataModule(str(tmp_path / "d3"), train_batches=2, download=True)
    with pytest.raises(DatasetNotFoundError) as info:
        offline.setup()
    assert "\n" not in str(info.value) and "image-net.org" in str(info.value)
