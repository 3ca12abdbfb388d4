"""Image datamodules on tiny real-format files: proc_blobs, PNG/JPEG/WebP folders, webdataset
tar shards (written with webdataset.TarWriter), CIFAR-10 and the missing-data errors."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader

from latentzoo.data.datasets.errors import DatasetNotFoundError
from latentzoo.data.datasets.proc_blobs import ProcBlobs
from latentzoo.data.datasets.webdataset_images import image_pipeline
from latentzoo.data.images import (
    ImageFolderDataModule,
    ProcBlobsDataModule,
    WebDatasetDataModule,
)
from latentzoo.data.labelled import CIFAR10DataModule
from latentzoo.utils.distributed import instantiate_datamodule
from tests.conftest import compose_config


def _png_bytes(array: np.ndarray, fmt: str = "png") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt)
    return buffer.getvalue()


# --------------------------------------------------------------------------- proc_blobs


@pytest.mark.parametrize("size", [32, 64, 256])
def test_proc_blobs_shapes_range_and_determinism(size: int) -> None:
    data = ProcBlobs(length=10, image_size=size, num_classes=3, seed=1)
    images, labels = data.get_batch([0, 3, 7])
    assert images.shape == (3, 3, size, size) and images.dtype == torch.float32
    assert images.min() >= 0.0 and images.max() <= 1.0 and images.std() > 0.05
    assert labels.dtype == torch.int64 and ((labels >= 0) & (labels < 3)).all()
    again = ProcBlobs(length=10, image_size=size, num_classes=3, seed=1)
    assert torch.equal(again[3][0], images[1])  # same (seed, index) -> identical bytes
    assert not torch.equal(images[0], images[1])
    assert not torch.equal(ProcBlobs(length=10, image_size=size, seed=2)[3][0], images[1])


def test_proc_blobs_datamodule_batches_and_disjoint_splits() -> None:
    dm = ProcBlobsDataModule(image_size=32, num_train=64, num_val=16, num_test=16, batch_size=8)
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (8, 3, 32, 32) and images.dtype == torch.float32
    assert labels.dtype == torch.int64 and (labels == 0).all() and dm.num_classes == 0
    assert dm.image_shape == (3, 32, 32)
    val = next(iter(dm.val_dataloader()))[0]
    assert torch.equal(val, next(iter(dm.val_dataloader()))[0])  # no augmentation, fixed order
    train_first = dm.datasets["train"][0][0]
    assert not torch.equal(val[0], train_first)  # val starts after the training indices


# --------------------------------------------------------------------------- image folders


def _write_folder(root: Path) -> dict[str, list[np.ndarray]]:
    rng = np.random.default_rng(0)
    written: dict[str, list[np.ndarray]] = {}
    for cls, ext in (("cat", "png"), ("dog", "jpg"), ("eel", "webp")):
        (root / "train" / cls / "deep").mkdir(parents=True)
        written[cls] = []
        for i in range(3):
            array = rng.integers(0, 256, (24, 40, 3), dtype=np.uint8)  # non-square
            path = root / "train" / cls / ("deep" if i == 2 else "") / f"{i}.{ext}"
            Image.fromarray(array).save(path, quality=95)
            written[cls].append(array)
    (root / "train" / "notes.txt").write_text("not an image")
    return written


def test_image_folder_recursive_class_labels_crop_and_flip(tmp_path: Path) -> None:
    written = _write_folder(tmp_path)
    dm = ImageFolderDataModule(
        root=str(tmp_path), image_size=16, class_folders=True, batch_size=9, num_workers=0
    )
    dm.setup()
    assert dm.num_classes == 3 and dm.classes == ["cat", "dog", "eel"]
    assert len(dm.datasets["train"]) == 9  # recursive, .txt ignored
    images, labels = next(iter(dm.val_dataloader()))  # fallback val = first train images
    assert images.shape == (9, 3, 16, 16) and images.min() >= 0 and images.max() <= 1
    assert sorted(labels.tolist()) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    # cat/0.png (lossless, 24x40): shorter side -> 16 (bicubic, 16x27), then the centre 16x16
    first = dm.datasets["train"][0][0]
    expected = Image.fromarray(written["cat"][0]).resize((27, 16), Image.Resampling.BICUBIC)
    expected = np.asarray(expected.crop((5, 0, 21, 16)))
    assert first.dtype == torch.uint8 and torch.equal(
        first, torch.from_numpy(expected).permute(2, 0, 1)
    )
    torch.manual_seed(0)
    flips = [next(iter(dm.train_dataloader()))[0] for _ in range(4)]
    # training batches contain horizontally flipped copies of the un-augmented images
    ref = torch.stack([dm.datasets["train"][i][0] for i in range(9)]).float() / 255
    flipped = 0
    for batch in flips:
        for image in batch:
            same = (image - ref).abs().flatten(1).amax(1).min() < 1e-6
            mirror = (image - ref.flip(-1)).abs().flatten(1).amax(1).min() < 1e-6
            assert same or mirror
            flipped += int(bool(mirror) and not bool(same))
    assert 0 < flipped < 36


def test_image_folder_flat_pool_split_and_subset(tmp_path: Path) -> None:
    for i in range(10):
        Image.fromarray(np.full((8, 8, 3), i * 20, np.uint8)).save(tmp_path / f"{i:05d}.png")
    dm = ImageFolderDataModule(root=str(tmp_path), image_size=8, val_size=3, test_size=2, subset=4)
    dm.setup()
    value = lambda split, i: int(dm.datasets[split][i][0][0, 0, 0])  # noqa: E731
    assert len(dm.datasets["train"]) == 4 and [value("train", i) for i in range(4)] == [
        0,
        20,
        40,
        60,
    ]
    assert [value("val", i) for i in range(3)] == [140, 160, 180]  # the LAST val_size files
    assert [value("test", i) for i in range(2)] == [100, 120]


def test_reference_dataset_is_ordered_and_unaugmented(tmp_path: Path) -> None:
    from latentzoo.data.labelled import SklearnDigitsDataModule
    from latentzoo.utils.errors import LatentzooError

    for i in range(5):
        array = np.zeros((8, 8, 3), np.uint8)
        array[:, :4] = 40 * i  # left half carries the index: a flip would show
        Image.fromarray(array).save(tmp_path / f"{i:05d}.png")
    dm = ImageFolderDataModule(root=str(tmp_path), image_size=8, flip=True)
    data = dm.reference_dataset("train")
    for _ in range(3):  # never flipped, always file order
        assert [int(data[i][0][0, 0, 0]) for i in range(5)] == [0, 40, 80, 120, 160]
        assert all(int(data[i][0][0, 0, 7]) == 0 for i in range(5))
    # per-item training augmentation (labelled sets) is left out
    digits = SklearnDigitsDataModule(augment="nfpi_cifar", image_size=8)
    plain = digits.reference_dataset("train")
    assert digits.datasets["train"].transform is not None and plain.transform is None
    first = [plain[i][0] for i in range(8)]
    assert all(torch.equal(a, plain[i][0]) for i, a in enumerate(first))
    web = WebDatasetDataModule(train_urls=str(tmp_path / "x-{0..1}.tar"))
    with pytest.raises(LatentzooError, match="image folder"):
        web.reference_dataset("train")


def test_image_folder_missing_and_empty_errors(tmp_path: Path) -> None:
    dm = ImageFolderDataModule(root=str(tmp_path / "nope"), name="celebahq256", source="SRC-URL")
    with pytest.raises(
        DatasetNotFoundError, match=r"celebahq256 not found: looked for .*nope.*SRC-URL"
    ):
        dm.setup()
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetNotFoundError, match="no image files"):
        ImageFolderDataModule(root=str(tmp_path / "empty")).setup()


# --------------------------------------------------------------------------- webdataset


def _write_shards(root: Path, shards: int = 4, per_shard: int = 5) -> str:
    rng = np.random.default_rng(0)
    for s in range(shards):
        with wds.TarWriter(str(root / f"train-{s:06d}.tar")) as sink:
            for i in range(per_shard):
                array = rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)
                sink.write({"__key__": f"s{s}_{i}", "png": _png_bytes(array), "cls": s % 3})
    return str(root / f"train-{{000000..{shards - 1:06d}}}.tar")


def test_webdataset_workers_and_ranks_see_each_sample_once(tmp_path: Path, monkeypatch) -> None:
    urls = _write_shards(tmp_path)
    expected = {f"s{s}_{i}" for s in range(4) for i in range(5)}

    def keys(num_workers: int) -> list[str]:
        pipe = image_pipeline(urls, image_size=8, train=False, with_keys=True)
        loader = DataLoader(pipe, batch_size=None, num_workers=num_workers)
        return [key for _, _, key in loader]

    seen = keys(num_workers=2)
    assert sorted(seen) == sorted(expected)  # 2 workers: no duplicates, nothing lost
    per_rank = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        per_rank.append(set(keys(num_workers=0)))
    assert per_rank[0].isdisjoint(per_rank[1]) and per_rank[0] | per_rank[1] == expected


def test_webdataset_datamodule_epoch_length_labels_and_missing(tmp_path: Path) -> None:
    urls = _write_shards(tmp_path)
    dm = WebDatasetDataModule(
        train_urls=urls,
        image_size=8,
        num_classes=3,
        epoch_length=30,
        batch_size=4,
        num_workers=2,
        pin_memory=False,
        shuffle_buffer=8,
    )
    batches = list(dm.train_dataloader())
    assert len(batches) == 30 // 4  # repeats the 20 samples to fill the epoch
    images, labels = batches[0]
    assert images.shape == (4, 3, 8, 8) and images.dtype == torch.float32
    assert labels.dtype == torch.int64 and set(labels.tolist()) <= {0, 1, 2}
    val = list(dm.val_dataloader())
    assert sum(len(b[1]) for b in val) == 20
    assert sorted(torch.cat([b[1] for b in val]).tolist()) == sorted([s % 3 for s in range(4)] * 5)
    bad = WebDatasetDataModule(train_urls=str(tmp_path / "x-{0..3}.tar"), name="ffhq256")
    with pytest.raises(DatasetNotFoundError, match=r"ffhq256 not found: looked for .*x-0\.tar"):
        bad.train_dataloader()


# --------------------------------------------------------------------------- torchvision / configs


def test_cifar10_missing_names_download_override(tmp_path: Path) -> None:
    dm = CIFAR10DataModule(root=str(tmp_path), download=False)
    with pytest.raises(DatasetNotFoundError, match=r"cifar-10-batches-py.*data\.download=true"):
        dm.setup()


@pytest.mark.parametrize(
    "name",
    [
        "celeba256",
        "ffhq256",
        "lsun_church",
        "lsun_bedroom",
        "imagenet256",
        "image_folder",
        "webdataset",
        "cifar10",
    ],
)
def test_image_configs_fail_with_a_clear_missing_data_error(name: str, tmp_path: Path) -> None:
    cfg = compose_config("train", [f"data={name}", f"paths.data_dir={tmp_path}/none"], tmp_path)
    dm = instantiate_datamodule(cfg.data)
    assert dm.image_shape[0] == 3 and dm.num_classes == (
        1000 if name == "imagenet256" else 10 if name == "cifar10" else 0
    )
    with pytest.raises(DatasetNotFoundError, match=f"looked for {tmp_path}/none"):
        dm.setup()
        dm.train_dataloader()


def test_proc_blobs_config_composes_with_a_model(tmp_path: Path) -> None:
    cfg = compose_config("train", ["data=proc_blobs", "data.image_size=32"], tmp_path)
    dm = instantiate_datamodule(cfg.data)
    assert dm.image_shape == (3, 32, 32) and list(cfg.data.image_shape) == [3, 32, 32]
