"""LMDB image datamodule on small databases written in the real formats with the ``lmdb`` package:
NVAE (keys str(i), raw RGB bytes or PNG), LSUN/torchvision (arbitrary keys, WEBP/JPEG)."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import lmdb
import numpy as np
import pytest
import torch
from PIL import Image

from latentzoo.data.datasets.errors import DatasetFormatError, DatasetNotFoundError
from latentzoo.data.lmdb import LMDBDataModule, LMDBImages, is_encoded_image
from latentzoo.utils.distributed import instantiate_datamodule
from tests.conftest import compose_config


def picture(i: int, h: int = 16, w: int = 16) -> np.ndarray:
    """Image i: red = 10·i, green rises left to right."""
    a = np.zeros((h, w, 3), np.uint8)
    a[..., 0] = 10 * i
    a[..., 1] = (np.arange(w)[None, :] * 255 // max(w - 1, 1)).astype(np.uint8)
    return a


def encoded(array: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    return buffer.getvalue()


def write_lmdb(path: Path, items: dict[bytes, bytes]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    env = lmdb.open(str(path), map_size=1 << 26)
    with env.begin(write=True) as txn:
        for key, value in items.items():
            txn.put(key, value)
    env.close()
    return path


def nvae(path: Path, n: int, fmt: str | None = None) -> Path:
    """NVAE layout: keys '0'..'n-1'; raw H×W×3 bytes (fmt None) or encoded images."""
    values = [picture(i).tobytes() if fmt is None else encoded(picture(i), fmt) for i in range(n)]
    return write_lmdb(path, {str(i).encode(): v for i, v in enumerate(values)})


def lsun(path: Path, n: int) -> tuple[Path, list[int]]:
    """LSUN layout: hex-digest keys, WEBP values; returns the image order in key order."""
    keys = {hashlib.sha1(str(i).encode()).hexdigest().encode(): i for i in range(n)}
    write_lmdb(path, {k: encoded(picture(i, 16, 24), "WEBP") for k, i in keys.items()})
    return path, [keys[k] for k in sorted(keys)]


@pytest.mark.parametrize("fmt", [None, "PNG"])
def test_nvae_layout_raw_and_encoded(fmt: str | None, tmp_path: Path) -> None:
    nvae(tmp_path / "train.lmdb", 12, fmt)
    nvae(tmp_path / "validation.lmdb", 3, fmt)
    dm = LMDBDataModule(str(tmp_path), image_size=16, batch_size=4)
    dm.setup()
    train = dm.reference_dataset("train")
    assert len(train) == 12 and len(dm.reference_dataset("val")) == 3
    assert train.layout == "index"
    for i in (0, 5, 11):
        image, label = train[i]
        assert image.dtype == torch.uint8 and label == 0
        assert torch.equal(image, torch.from_numpy(picture(i)).permute(2, 0, 1))
    images, _ = next(iter(dm.reference_dataloader("val", batch_size=3)))
    assert torch.allclose(images[2, 0], torch.full((16, 16), 20 / 255))
    assert dm.reference_info("train")["lmdb"] == "train.lmdb"


def test_lsun_layout_key_order_subset_crop_and_workers(tmp_path: Path) -> None:
    _, order = lsun(tmp_path / "church_outdoor_train_lmdb", 10)
    dm = LMDBDataModule(
        str(tmp_path),
        image_size=16,
        train="church_outdoor_train_lmdb",
        val=None,
        subset=6,
        fallback_val_size=2,
        batch_size=3,
        num_workers=2,
    )
    dm.setup()
    train = dm.reference_dataset("train")
    assert train.layout == "keys" and len(train) == 6 and len(dm.reference_dataset("val")) == 2
    # item j is the j-th key in LMDB order; 16x24 is centre-cropped to 16x16
    reds = torch.cat([x[:, 0, 0, 0] for x, _ in dm.reference_dataloader("train", batch_size=4)])
    assert torch.allclose(reds * 255, torch.tensor([10.0 * i for i in order[:6]]), atol=0.5)
    image = train[0][0]
    assert image.shape == (3, 16, 16)
    green = torch.from_numpy(picture(order[0], 16, 24)[:, 4:20, 1])
    assert torch.equal(image[1], green)  # the centre 16 columns
    batch, _ = next(iter(dm.train_dataloader()))  # worker processes open their own handles
    assert batch.shape == (3, 3, 16, 16)


def test_missing_and_malformed(tmp_path: Path) -> None:
    dm = LMDBDataModule(str(tmp_path / "none"), image_size=16, prepare="make_lmdb.py")
    with pytest.raises(DatasetNotFoundError, match="train.lmdb.*data.mdb.*make_lmdb.py"):
        dm.setup()
    write_lmdb(tmp_path / "bad", {b"0": b"\x01" * 10})
    with pytest.raises(DatasetFormatError, match="neither an encoded image"):
        LMDBImages(tmp_path / "bad", 16)[0]
    assert is_encoded_image(encoded(picture(0), "JPEG")) and is_encoded_image(
        encoded(picture(0), "WEBP")
    )
    assert not is_encoded_image(picture(0).tobytes())


@pytest.mark.parametrize("name", ["celebahq256_lmdb", "lsun_church_lmdb", "lsun_bedroom_lmdb"])
def test_lmdb_configs(name: str, tmp_path: Path) -> None:
    cfg = compose_config("train", [f"data={name}", f"paths.data_dir={tmp_path}"], tmp_path)
    dm = instantiate_datamodule(cfg.data)
    assert dm.image_shape == (3, 256, 256)
    with pytest.raises(DatasetNotFoundError, match=f"looked for {tmp_path}"):
        dm.setup()
    if name == "celebahq256_lmdb":  # NVAE layout below data_dir: it reads
        nvae(tmp_path / "celebahq256_lmdb" / "train.lmdb", 2)
        nvae(tmp_path / "celebahq256_lmdb" / "validation.lmdb", 1)
        dm = instantiate_datamodule(cfg.data)
        x, _ = next(iter(dm.reference_dataloader("train", batch_size=2)))
        assert x.shape == (2, 3, 256, 256)  # 16px raw images resized to 256
