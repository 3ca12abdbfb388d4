"""Labelled image DataModules on tiny files in the real formats (CIFAR pickles, MNIST idx, SVHN
.mat, ImageNet32 npz), scikit-learn digits and the procedural proc_cifar renderer."""

from __future__ import annotations

import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from latentzoo.data.datasets.errors import DatasetNotFoundError
from latentzoo.data.datasets.proc_cifar import ProcCIFAR
from latentzoo.data.labelled import (
    CIFAR10DataModule,
    ImageNet32DataModule,
    ProcCIFARDataModule,
    SklearnDigitsDataModule,
    TorchvisionDataModule,
    make_augment,
)
from latentzoo.utils.distributed import instantiate_datamodule
from tests.conftest import compose_config

RNG = np.random.default_rng(0)


@pytest.fixture
def no_md5(monkeypatch: pytest.MonkeyPatch) -> None:
    """Our tiny files cannot match torchvision's published MD5s: check existence only."""
    import torchvision.datasets.cifar as cifar
    import torchvision.datasets.svhn as svhn

    def exists(path: str, md5: str | None = None) -> bool:
        return os.path.isfile(path)

    monkeypatch.setattr(cifar, "check_integrity", exists)
    monkeypatch.setattr(svhn, "check_integrity", exists)


def _cifar(root: Path, folder: str, files: dict[str, int], label_key: str, classes: int) -> None:
    out = root / folder
    out.mkdir(parents=True)
    for name, n in files.items():
        labels = (np.arange(n) % classes).tolist()
        data = RNG.integers(0, 256, (n, 3072), dtype=np.uint8)
        with open(out / name, "wb") as f:
            pickle.dump({"data": data, label_key: labels}, f)
    meta_name, key = ("batches.meta", "label_names")
    if classes == 100:
        meta_name, key = ("meta", "fine_label_names")
    with open(out / meta_name, "wb") as f:
        pickle.dump({key: [f"c{i}" for i in range(classes)]}, f)


def _idx(path: Path, array: np.ndarray) -> None:
    """IDX file as in yann.lecun.com's MNIST: magic (0, 0, 0x08 ubyte, ndim), big-endian dims."""
    header = struct.pack(">BBBB", 0, 0, 8, array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def _mnist(root: Path, folder: str = "MNIST", n_train: int = 60, n_test: int = 20) -> None:
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    for split, n in (("train", n_train), ("t10k", n_test)):
        images = RNG.integers(1, 256, (n, 28, 28), dtype=np.uint8)  # no zeros: the pad shows
        _idx(raw / f"{split}-images-idx3-ubyte", images)
        _idx(raw / f"{split}-labels-idx1-ubyte", np.arange(n) % 10)


def _svhn(root: Path, sizes: dict[str, int]) -> None:
    from scipy.io import savemat

    root.mkdir(parents=True, exist_ok=True)
    for split, n in sizes.items():
        y = (np.arange(n) % 10 + 1).reshape(n, 1)  # SVHN's label 10 is digit 0
        x = RNG.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
        savemat(root / f"{split}_32x32.mat", {"X": x, "y": y})


def _batches(loader) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = zip(*loader, strict=True)
    return torch.cat(images), torch.cat(labels)


def test_cifar10_shapes_labels_items_per_class_and_flip(tmp_path: Path, no_md5: None) -> None:
    files = {f"data_batch_{i}": 40 for i in range(1, 6)} | {"test_batch": 30}
    _cifar(tmp_path / "c10", "cifar-10-batches-py", files, "labels", 10)
    dm = CIFAR10DataModule(root=str(tmp_path / "c10"), val_size=8, batch_size=10)
    assert dm.augment == "flip" and dm.flip and dm.image_shape == (3, 32, 32)
    images, labels = _batches(dm.test_dataloader())
    assert images.shape == (30, 3, 32, 32) and images.dtype == torch.float32
    assert labels.dtype == torch.int64 and labels.tolist() == [i % 10 for i in range(30)]
    with open(tmp_path / "c10/cifar-10-batches-py/test_batch", "rb") as f:
        raw = pickle.load(f)["data"][3].reshape(3, 32, 32)  # R plane, G plane, B plane
    assert torch.equal(images[3], torch.from_numpy(raw).float() / 255)
    assert len(dm.datasets["train"]) == 192 and len(dm.datasets["val"]) == 8  # val from train

    sub = TorchvisionDataModule(
        root=str(tmp_path / "c10"), dataset="cifar10", items_per_class=3, batch_size=6, val_size=20
    )
    sub.setup()
    counts = torch.bincount(sub.datasets["train"].labels[sub.datasets["train"].indices])
    assert counts.tolist() == [3] * 10
    again = TorchvisionDataModule(
        root=str(tmp_path / "c10"), items_per_class=3, subset_seed=1, val_size=20
    )
    again.setup()
    assert not torch.equal(again.datasets["train"].indices, sub.datasets["train"].indices)


def test_nfpi_cifar_augment_changes_train_not_test(tmp_path: Path, no_md5: None) -> None:
    _cifar(tmp_path, "cifar-100-python", {"train": 100, "test": 50}, "fine_labels", 100)
    dm = TorchvisionDataModule(
        root=str(tmp_path), dataset="cifar100", augment="nfpi_cifar", batch_size=20, val_size=0
    )
    assert dm.num_classes == 100 and not dm.flip
    torch.manual_seed(0)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (20, 3, 32, 32) and x.dtype == torch.float32
    assert x.min() >= 0.0 and x.max() <= 1.0 and y.max() < 100
    plain = dm.datasets["train"].without_augment()
    ref = torch.stack([plain[i][0] for i in range(100)]).float() / 255
    first = dm.datasets["train"][0][0]
    assert (first.float() / 255 - ref[0]).abs().mean() > 0.02  # augmented
    t1, _ = _batches(dm.test_dataloader())
    t2, _ = _batches(dm.test_dataloader())
    assert torch.equal(t1, t2)  # test split: no augmentation
    r, _ = _batches(dm.reference_dataloader("train", batch_size=64))
    assert torch.equal(r, ref)  # FID reference: un-augmented, ordered


def test_mnist_pad_channels_and_nfpi_mnist(tmp_path: Path) -> None:
    _mnist(tmp_path)
    dm = TorchvisionDataModule(
        root=str(tmp_path),
        dataset="mnist",
        pad=2,
        resolution=32,
        channels=3,
        batch_size=20,
        val_size=6,
    )
    assert dm.image_shape == (3, 32, 32)
    x, y = next(iter(dm.test_dataloader()))
    assert x.shape == (20, 3, 32, 32) and y.tolist() == [i % 10 for i in range(20)]
    assert x[:, :, :2].abs().max() == 0 and x[:, :, 2:30, 2:30].min() > 0  # zero border only
    assert torch.equal(x[:, 0], x[:, 2])  # grey replicated
    with pytest.raises(ValueError, match="data.resolution=32"):
        TorchvisionDataModule(root=str(tmp_path), dataset="mnist", pad=2, resolution=28)
    aug = TorchvisionDataModule(
        root=str(tmp_path), dataset="mnist", pad=2, resolution=32, augment="nfpi_mnist", val_size=6
    )
    aug.setup()
    xa, _ = aug.datasets["train"][0]
    xp, _ = aug.datasets["train"].without_augment()[0]
    assert xa.dtype == torch.float32 and xa.shape == (1, 32, 32)
    assert xa.min() >= 0.0 and xa.max() < 1.05 and not torch.equal(xa, xp.float() / 255)


def test_svhn_train_extra_and_labels(tmp_path: Path, no_md5: None) -> None:
    _svhn(tmp_path, {"train": 30, "test": 20, "extra": 50})
    dm = TorchvisionDataModule(
        root=str(tmp_path), dataset="svhn", splits=["train", "extra"], val_size=0
    )
    dm.setup()
    assert len(dm.datasets["train"]) == 80 and len(dm.datasets["test"]) == 20
    assert sorted(set(dm.datasets["train"].labels.tolist())) == list(range(10))
    x, y = dm.datasets["test"][1]
    assert x.shape == (3, 32, 32) and x.dtype == torch.uint8 and int(y) == 2
    assert int(dm.datasets["test"][9][1]) == 0  # file label 10 -> digit 0
    from scipy.io import loadmat

    raw = loadmat(tmp_path / "test_32x32.mat")["X"][:, :, :, 1]  # (H, W, C, N)
    assert torch.equal(x, torch.from_numpy(raw).permute(2, 0, 1))


def test_missing_data_errors_name_folder_url_and_download(tmp_path: Path) -> None:
    dm = TorchvisionDataModule(root=str(tmp_path), dataset="fashion_mnist")
    with pytest.raises(DatasetNotFoundError) as info:
        dm.setup()
    msg = str(info.value)
    assert f"{tmp_path}/FashionMNIST/raw" in msg and "train-images-idx3-ubyte" in msg
    assert "fashion-mnist" in msg and "data.download=true" in msg
    inet = ImageNet32DataModule(root=str(tmp_path / "in32"))
    with pytest.raises(DatasetNotFoundError, match=r"in32.*val_data.*npz.*image-net\.org"):
        inet.setup()


def test_imagenet32_npz_rows_and_zero_based_labels(tmp_path: Path) -> None:
    rows = {}
    for name, n in (("train_data_batch_1", 12), ("train_data_batch_2", 8), ("val_data", 6)):
        data = RNG.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = np.arange(n) % 1000 + 1 + (500 if name == "val_data" else 0)
        np.savez(tmp_path / f"{name}.npz", data=data, labels=labels, mean=data.mean(0))
        rows[name] = (data, labels)
    dm = ImageNet32DataModule(root=str(tmp_path), train_batches=2, val_size=0, batch_size=4)
    dm.setup()
    assert len(dm.datasets["train"]) == 20 and len(dm.datasets["val"]) == 4  # a preview batch
    x, y = dm.datasets["train"][13]  # second file, row 1
    assert torch.equal(x, torch.from_numpy(rows["train_data_batch_2"][0][1].reshape(3, 32, 32)))
    assert int(y) == 1  # label 2 -> 1
    assert dm.datasets["test"][0][1] == 500


def test_sk_digits_split_sizes_labels_and_resize() -> None:
    dm = SklearnDigitsDataModule(image_size=16, batch_size=64)
    dm.setup()
    sizes = {s: len(dm.datasets[s]) for s in ("train", "val", "test")}
    assert sizes == {"train": 1257, "val": 180, "test": 360}
    test_labels = dm.datasets["test"].labels
    assert torch.bincount(test_labels).min() >= 35  # stratified: ~36 per class
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (64, 1, 16, 16) and x.min() >= 0 and x.max() == 1.0
    # 16 grey levels survive the nearest resize: values are multiples of 1/16 (to uint8 rounding)
    assert len(torch.unique(x)) <= 17
    same = SklearnDigitsDataModule()
    same.setup()
    assert torch.equal(same.datasets["test"].labels, test_labels)


def test_proc_cifar_determinism_and_classes() -> None:
    a = ProcCIFAR("train", length=40, seed=3)
    b = ProcCIFAR("train", length=40, seed=3, cache=True)
    xa = a.images_u8_of(np.arange(40))
    assert torch.equal(xa[[7, 2]], b.images_u8_of([7, 2])) and xa.dtype == torch.uint8
    assert not torch.equal(xa, ProcCIFAR("test", length=40, seed=3).images_u8_of(range(40)))
    assert torch.bincount(a.labels).tolist() == [4] * 10
    # class means differ: 10 distinct classes (shape x palette) in the pixels
    means = torch.stack([xa[a.labels == c].float().mean(0) for c in range(10)])
    assert torch.cdist(means.flatten(1), means.flatten(1)).add(torch.eye(10) * 1e9).min() > 50
    dm = ProcCIFARDataModule(num_train=40, num_test=20, val_size=5, batch_size=8)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 3, 32, 32) and y.dtype == torch.int64 and len(dm.datasets["val"]) == 5


@pytest.mark.parametrize(
    "name,shape",
    [
        ("mnist", [1, 28, 28]),
        ("fashion_mnist", [1, 28, 28]),
        ("cifar100", [3, 32, 32]),
        ("svhn", [3, 32, 32]),
        ("imagenet32_labelled", [3, 32, 32]),
        ("sk_digits", [1, 8, 8]),
        ("proc_cifar", [3, 32, 32]),
        ("celeba64", [3, 64, 64]),
    ],
)
def test_configs_instantiate(name: str, shape: list[int], tmp_path: Path) -> None:
    cfg = compose_config("train", [f"data={name}", f"paths.data_dir={tmp_path}"], tmp_path)
    dm = instantiate_datamodule(cfg.data)
    assert list(dm.image_shape) == shape == list(cfg.data.image_shape)


def test_mnist_config_pad_follows_resolution(tmp_path: Path) -> None:
    over = ["data=mnist", "data.pad=2", "data.resolution=32", "data.channels=3"]
    cfg = compose_config("train", over, tmp_path)
    assert list(cfg.data.image_shape) == [3, 32, 32]
    assert instantiate_datamodule(cfg.data).image_shape == (3, 32, 32)
    cfg = compose_config("train", ["data=celebahq256"], tmp_path)
    assert cfg.data.val_size == 1000 and cfg.data.image_size == 256


def test_augment_pipelines_keep_shape() -> None:
    x = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    torch.manual_seed(0)
    out = make_augment("nfpi_cifar", 32)(x)  # type: ignore[misc]
    assert out.shape == (3, 32, 32) and out.dtype == torch.uint8 and not torch.equal(out, x)
    assert make_augment("flip", 32) is None and make_augment("none", 32) is None
    with pytest.raises(ValueError, match="augment must be one of"):
        make_augment("jitter", 32)
