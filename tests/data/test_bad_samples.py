"""A corrupt file inside a dataset is named with its path and what is wrong with it, in one line
that points the right way; ``data.on_bad_sample=skip`` drops bad samples, counts them and
reports the count and first paths at the end of the epoch."""

from __future__ import annotations

import io
import logging
import struct
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader

from latentzoo.data.bad_samples import BadSampleLog
from latentzoo.data.datasets import DSprites, Shapes3D
from latentzoo.data.datasets.errors import BadSampleError, DatasetFormatError
from latentzoo.data.datasets.webdataset_images import image_pipeline
from latentzoo.data.images import ImageFolderDataModule
from latentzoo.utils.errors import LatentzooError
from tests.data.test_real_datasets import (
    DSPRITES_SIZES,
    SHAPES3D_SIZES,
    write_dsprites,
    write_shapes3d,
)


def png_bytes(seed: int, side: int = 12) -> bytes:
    array = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "PNG")
    return buffer.getvalue()


def image_folder(root: Path, good: int = 8) -> dict[str, Path]:
    """``good`` valid PNGs plus a truncated PNG and a zero-byte JPG."""
    root.mkdir(parents=True)
    for i in range(good):
        (root / f"{i:03d}.png").write_bytes(png_bytes(i))
    truncated = root / "050_truncated.png"
    truncated.write_bytes(png_bytes(99, side=64)[:300])
    empty = root / "051_empty.jpg"
    empty.write_bytes(b"")
    return {"truncated": truncated, "empty": empty}


def one_line(error: BaseException) -> str:
    message = str(error)
    assert "\n" not in message and "Traceback" not in message, message
    return message


def test_corrupt_images_are_named_with_what_is_wrong(tmp_path: Path) -> None:
    bad = image_folder(tmp_path / "images")
    dm = ImageFolderDataModule(root=str(tmp_path / "images"), image_size=8, fallback_val_size=0)
    dm.setup()
    train = dm.datasets["train"]
    for name, what in (("truncated", "truncated"), ("empty", "empty (0 bytes)")):
        with pytest.raises(BadSampleError) as raised:
            train[train.files.index(bad[name])]
        message = one_line(raised.value)
        assert str(bad[name]) in message and what in message
        assert "data.on_bad_sample=skip" in message
    # raised in a DataLoader worker: still the one-line message, not the worker's traceback
    loader = DataLoader(train, batch_size=len(train.files), num_workers=1)
    with pytest.raises(BadSampleError) as raised:
        next(iter(loader))
    assert str(bad["truncated"]) in one_line(raised.value)


class TinyModel(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(3 * 8 * 8, 1)
        self.seen = 0

    def training_step(self, batch, batch_idx):
        self.seen += len(batch[0])
        return self.layer(batch[0].flatten(1)).mean()

    def validation_step(self, batch, batch_idx):
        return None

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_skip_drops_counts_and_reports_bad_images_per_epoch(tmp_path: Path, caplog) -> None:
    bad = image_folder(tmp_path / "images", good=10)
    dm = ImageFolderDataModule(
        root=str(tmp_path / "images"),
        image_size=8,
        val_size=4,
        batch_size=4,
        num_workers=2,
        pin_memory=False,
        on_bad_sample="skip",
    )
    model = TinyModel()
    trainer = L.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=1,  # its bad samples are not counted twice
    )
    with caplog.at_level(logging.WARNING):
        trainer.fit(model, datamodule=dm)
    reports = [r.getMessage() for r in caplog.records if "bad sample" in r.getMessage()]
    # the pool's last 4 files are val (2 good + the 2 bad ones); train has 8 good files
    val_reports = [r for r in reports if "val epoch" in r]
    assert len(val_reports) == 2, reports  # once per epoch, counts cleared in between
    for report in val_reports:
        assert "skipped 2 bad sample(s)" in report
        assert str(bad["truncated"]) in report and str(bad["empty"]) in report
        assert "empty (0 bytes)" in report and "\n" not in report
    assert not [r for r in reports if "train epoch" in r]
    assert model.seen == 2 * 8  # whole batches of good images only
    for images, _ in dm.val_dataloader():  # bad files replaced: batches keep their size
        assert images.shape == (4, 3, 8, 8)


def test_bad_sample_log_is_shared_with_workers() -> None:
    log = BadSampleLog(keep=2)

    class Failing(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 6

        def __getitem__(self, index: int) -> int:
            if index % 2:
                log.add(f"file{index}", "bad")
            return index

    list(DataLoader(Failing(), batch_size=1, num_workers=2))
    count, names = log.take()
    assert count == 3 and len(names) >= 2 and all(n.endswith("(bad)") for n in names)
    assert log.take() == (0, [])


def test_on_bad_sample_must_be_error_or_skip(tmp_path: Path) -> None:
    with pytest.raises(LatentzooError, match="data.on_bad_sample='drop'"):
        ImageFolderDataModule(root=str(tmp_path), on_bad_sample="drop")


# ---------------------------------------------------------------------------- npz / h5 files


@pytest.mark.parametrize("damage", ["deflate stream", "crc"])
def test_zlib_corrupt_dsprites_npz_names_the_damage(tmp_path: Path, damage: str) -> None:
    path = write_dsprites(tmp_path)["path"]
    data = bytearray(path.read_bytes())
    if damage == "crc":  # valid deflate, wrong bytes: zipfile's CRC check
        middle = len(data) // 3
        data[middle : middle + 400] = bytes(range(256)) + bytes(144)
    else:  # the first compressed block of imgs.npy: zlib.error
        name_length, extra_length = struct.unpack("<HH", data[26:30])
        start = 30 + name_length + extra_length
        data[start : start + 64] = b"\xff" * 64
    path.write_bytes(bytes(data))
    with pytest.raises(DatasetFormatError) as raised:
        DSprites(tmp_path, factor_sizes=DSPRITES_SIZES)
    message = one_line(raised.value)
    assert str(path) in message and "damaged" in message and "download it again" in message
    assert "pickle" not in message


def test_garbage_npz_is_not_an_archive_not_a_pickle_problem(tmp_path: Path) -> None:
    path = tmp_path / DSprites.FILENAME
    path.write_text("<html>404 Not Found</html>")
    with pytest.raises(DatasetFormatError) as raised:
        DSprites(tmp_path, factor_sizes=DSPRITES_SIZES)
    message = one_line(raised.value)
    assert str(path) in message and "not a complete npz (zip) archive" in message
    assert "HTML" in message and "pickle" not in message


def test_bad_shapes3d_chunk_names_the_damage(tmp_path: Path) -> None:
    path = write_shapes3d(tmp_path)["path"]
    data = bytearray(path.read_bytes())
    middle = len(data) // 2  # inside the gzip chunks of the images
    data[middle : middle + 2000] = b"\xff" * 2000
    path.write_bytes(bytes(data))
    with pytest.raises(DatasetFormatError) as raised:
        Shapes3D(tmp_path, factor_sizes=SHAPES3D_SIZES, progress=False)
    message = one_line(raised.value)
    assert str(path) in message and "images[" in message and "damaged" in message
    assert "LOCKING" not in message and "another process" not in message


def test_garbage_h5_is_not_hdf5_not_a_locking_problem(tmp_path: Path) -> None:
    path = tmp_path / Shapes3D.FILENAME
    path.write_bytes(b"\x00" * 5000)
    with pytest.raises(DatasetFormatError) as raised:
        Shapes3D(tmp_path, factor_sizes=SHAPES3D_SIZES)
    message = one_line(raised.value)
    assert str(path) in message and "not an HDF5 file" in message
    assert "LOCKING" not in message and "another process" not in message


# ------------------------------------------------------------------------------- webdataset


def shards(root: Path) -> tuple[str, Path, Path]:
    """Three shards of 4 samples: the second truncated, the third with one corrupt PNG."""
    for s in range(3):
        with wds.TarWriter(str(root / f"s-{s}.tar")) as sink:
            for i in range(4):
                image = png_bytes(10 * s + i)
                if s == 2 and i == 1:
                    image = image[:40]
                sink.write({"__key__": f"k{s}_{i}", "png": image, "cls": s})
    truncated = root / "s-1.tar"
    data = truncated.read_bytes()
    truncated.write_bytes(data[: len(data) // 2 + 100])
    return str(root / "s-{0..2}.tar"), truncated, root / "s-2.tar"


def test_webdataset_truncated_shard_and_corrupt_sample_are_named(tmp_path: Path) -> None:
    urls, truncated, corrupt = shards(tmp_path)
    with pytest.raises(BadSampleError) as raised:
        list(image_pipeline(str(truncated), image_size=8, train=False))
    message = one_line(raised.value)
    assert str(truncated) in message and "truncated tar shard" in message
    # cut at a block boundary (tarfile then just stops early): no end-of-archive blocks
    whole = tmp_path / "s-0.tar"
    whole.write_bytes(whole.read_bytes()[: 5 * 512])
    with pytest.raises(BadSampleError, match="truncated tar shard .no end-of-archive"):
        list(image_pipeline(str(whole), image_size=8, train=False))
    with pytest.raises(BadSampleError) as raised:
        list(image_pipeline(str(corrupt), image_size=8, train=False))
    message = one_line(raised.value)
    assert str(corrupt) in message and "k2_1.png" in message and "truncated" in message


def test_webdataset_skip_counts_bad_shards_and_samples(tmp_path: Path) -> None:
    urls, truncated, corrupt = shards(tmp_path)
    log = BadSampleLog()
    pipe = image_pipeline(urls, image_size=8, train=False, with_keys=True, bad_samples=log)
    keys = [key for _, _, key in DataLoader(pipe, batch_size=None, num_workers=2)]
    assert {f"k0_{i}" for i in range(4)} <= set(keys)
    assert {"k2_0", "k2_2", "k2_3"} <= set(keys) and "k2_1" not in keys
    count, names = log.take()
    assert count == 2, names  # the truncated shard's tail, the corrupt PNG
    assert any(str(truncated) in n for n in names) and any("k2_1" in n for n in names)


def test_tar_error_from_a_remote_shard_names_its_url() -> None:
    import tarfile

    from latentzoo.data.datasets.webdataset_images import OnBadSample

    error = tarfile.ReadError("unexpected end of data", object(), "pipe:cat s3://b/s-7.tar")
    with pytest.raises(BadSampleError, match=r"pipe:cat s3://b/s-7\.tar: damaged or truncated"):
        OnBadSample()(error)
    log = BadSampleLog()
    assert OnBadSample(log)(error) is True
    assert log.take()[0] == 1
    with pytest.raises(TypeError):  # not a data problem: surfaces unchanged
        OnBadSample(log)(TypeError("a bug"))


def test_garbage_nvidia3d_npy_is_not_a_pickle_problem(tmp_path: Path) -> None:
    from latentzoo.data.datasets.nvidia3d import Falcor3D
    from tests.data.test_real_datasets import FALCOR_SIZES

    path = tmp_path / "falcor3d_16.npy"
    path.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0\n")
    with pytest.raises(DatasetFormatError) as raised:
        Falcor3D(tmp_path, resolution=16, factor_sizes=FALCOR_SIZES)
    message = one_line(raised.value)
    assert str(path) in message and "not a .npy file" in message and "pickle" not in message


def test_corrupt_lmdb_image_names_the_key(tmp_path: Path) -> None:
    from latentzoo.data.lmdb import LMDBImages
    from tests.data.test_lmdb import encoded, picture, write_lmdb

    good = encoded(picture(0), "PNG")
    path = write_lmdb(tmp_path / "set.lmdb", {b"0": good, b"1": good[:60]})
    images = LMDBImages(path, image_size=8)
    assert images[0][0].shape == (3, 8, 8)
    with pytest.raises(BadSampleError) as raised:
        images[1]
    message = one_line(raised.value)
    assert str(path) in message and "key b'1'" in message and "truncated" in message
