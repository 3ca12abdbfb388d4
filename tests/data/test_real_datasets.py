"""Loaders of the real ground-truth sets (dSprites npz, 3D Shapes h5, Falcor3D/Isaac3D PNGs).

No real dataset is downloaded: each test writes a small file in the official format (same keys,
dtypes and per-image shapes) holding a smaller full factorial grid, and loads it through the real
code with a ``factor_sizes`` override. Labels are written from an independent meshgrid, so the
checks below compare the loaders' index arithmetic against the file's own labels.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from latentzoo.data import GroundTruthDataModule
from latentzoo.data.datasets import (
    DatasetChecksumError,
    DatasetFormatError,
    DatasetNotFoundError,
    DSprites,
    Falcor3D,
    Isaac3D,
    Shapes3D,
    download_url,
    nvidia3d,
)
from latentzoo.data.datasets.download import file_checksum, parse_checksum
from latentzoo.utils.errors import LatentzooError

DSPRITES_SIZES = (1, 3, 2, 4, 2, 3)  # 144 images
SHAPES3D_SIZES = (2, 3, 2, 2, 4, 3)  # 288 images
FALCOR_SIZES = (2, 1, 1, 1, 1, 2, 3)  # 12 images
ISAAC_SIZES = (1, 2, 1, 1, 1, 1, 2, 1, 2)  # 8 images


def grid_classes(sizes: tuple[int, ...]) -> np.ndarray:
    """All factor classes (N, K) in row-major order (last factor fastest), via meshgrid."""
    mesh = np.meshgrid(*[np.arange(s) for s in sizes], indexing="ij")
    return np.stack([m.reshape(-1) for m in mesh], axis=1).astype(np.int64)


# ---------------------------------------------------------------------- file writers
def write_dsprites(root: Path, sizes=DSPRITES_SIZES, n_drop: int = 0, seed: int = 0) -> dict:
    """dSprites-format npz with random {0, 1} images; returns the arrays written."""
    rng = np.random.default_rng(seed)
    classes = grid_classes(sizes)
    grids = [
        np.ones(1),
        np.arange(1.0, 4.0),
        np.linspace(0.5, 1.0, 6),
        np.linspace(0.0, 2 * np.pi, 40),
        np.linspace(0.0, 1.0, 32),
        np.linspace(0.0, 1.0, 32),
    ]
    values = np.stack([grids[k][classes[:, k]] for k in range(6)], axis=1)
    imgs = rng.integers(0, 2, size=(len(classes), 64, 64), dtype=np.uint8)
    metadata = np.array({"latents_sizes": np.array(sizes), "title": "test"}, dtype=object)
    keep = slice(0, len(classes) - n_drop)
    root.mkdir(parents=True, exist_ok=True)
    path = root / DSprites.FILENAME
    np.savez_compressed(
        path,
        imgs=imgs[keep],
        latents_values=values[keep],
        latents_classes=classes[keep],
        metadata=metadata,
    )
    return {"imgs": imgs, "values": values, "classes": classes, "path": path}


def write_shapes3d(root: Path, sizes=SHAPES3D_SIZES, n_drop: int = 0, seed: int = 0) -> dict:
    """3D Shapes-format h5 (gzip, multi-image chunks as in a sequential-read file)."""
    rng = np.random.default_rng(seed)
    classes = grid_classes(sizes)
    n_hue = [np.linspace(0.0, 0.9, s) for s in sizes[:3]]
    grids = [*n_hue, np.linspace(0.75, 1.25, sizes[3]), np.arange(sizes[4]) * 1.0]
    grids.append(np.linspace(-30.0, 30.0, sizes[5]))
    labels = np.stack([grids[k][classes[:, k]] for k in range(6)], axis=1)
    images = rng.integers(0, 256, size=(len(classes), 64, 64, 3), dtype=np.uint8)
    n = len(classes) - n_drop
    root.mkdir(parents=True, exist_ok=True)
    path = root / Shapes3D.FILENAME
    with h5py.File(path, "w") as f:
        f.create_dataset("images", data=images[:n], chunks=(32, 64, 64, 3), compression="gzip")
        f.create_dataset("labels", data=labels[:n])
    return {"images": images, "labels": labels, "classes": classes, "path": path}


def write_pngs(folder: Path, n: int, side: int, seed: int = 0) -> np.ndarray:
    """``n`` random RGB PNGs named <index:06d>.png, written in shuffled order."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, side, side, 3), dtype=np.uint8)
    folder.mkdir(parents=True, exist_ok=True)
    for i in rng.permutation(n):
        Image.fromarray(images[i]).save(folder / f"{i:06d}.png")
    return images


# ---------------------------------------------------------------------- download
def test_download_file_url_checksums_and_atomicity(tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(np.random.default_rng(0).bytes(3 << 20))  # 3 MiB: several blocks
    md5 = hashlib.md5(src.read_bytes()).hexdigest()
    sha = hashlib.sha256(src.read_bytes()).hexdigest()
    assert file_checksum(src, "sha256") == sha
    assert parse_checksum(md5) == ("md5", md5) and parse_checksum(f"SHA256:{sha}") == (
        "sha256",
        sha,
    )
    assert parse_checksum(None) is None
    with pytest.raises(ValueError, match="checksum"):
        parse_checksum("crc:1234")

    out = download_url(src.as_uri(), tmp_path / "a" / "out.bin", checksum=f"sha256:{sha}")
    assert out.read_bytes() == src.read_bytes()
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # not the temp file's private 0600
    download_url(src.as_uri(), tmp_path / "b" / "out.bin", checksum=md5, progress=False)

    bad = tmp_path / "c" / "out.bin"
    with pytest.raises(DatasetChecksumError, match="checksum mismatch") as info:
        download_url(src.as_uri(), bad, checksum="md5:" + "0" * 32)
    assert isinstance(info.value, LatentzooError)
    assert list(bad.parent.iterdir()) == []  # neither the file nor a partial download is kept


def test_download_offline_gives_clear_message(tmp_path: Path, monkeypatch) -> None:
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    dest = tmp_path / "data" / "file.npz"
    with pytest.raises(DatasetNotFoundError) as info:
        download_url("https://example.invalid/file.npz", dest, name="Thing")
    message = str(info.value)
    assert str(dest) in message and "https://example.invalid/file.npz" in message
    assert "by hand" in message and "name resolution" in message
    assert list(dest.parent.iterdir()) == []


def test_download_truncated_response_is_not_kept(tmp_path: Path, monkeypatch) -> None:
    class Truncated(io.BytesIO):
        headers = {"Content-Length": "1000"}

    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: Truncated(b"x" * 600))
    dest = tmp_path / "file.h5"
    with pytest.raises(DatasetNotFoundError, match="incomplete download: 600 of 1000 bytes"):
        download_url("https://example.invalid/file.h5", dest)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------- dSprites
def test_dsprites_items_match_file(tmp_path: Path) -> None:
    ref = write_dsprites(tmp_path)
    ds = DSprites(tmp_path, factor_sizes=DSPRITES_SIZES)
    n = len(ref["classes"])
    assert len(ds) == n and ds.image_shape == (1, 64, 64)
    for i in (0, 1, 37, n - 1):
        image, factors = ds[i]
        assert image.dtype == torch.float32 and image.shape == (1, 64, 64)
        assert torch.equal(factors, torch.from_numpy(ref["classes"][i]))
        assert torch.equal(image[0], torch.from_numpy(ref["imgs"][i]).float())
    order = np.random.default_rng(1).permutation(n)[:50]
    images, factors = ds.get_batch(order)
    assert torch.equal(factors, torch.from_numpy(ref["classes"][order]))
    assert torch.equal(images[:, 0].to(torch.uint8), torch.from_numpy(ref["imgs"][order]))
    assert set(images.unique().tolist()) <= {0.0, 1.0}
    np.testing.assert_array_equal(ds.values_of(ref["classes"]), ref["values"])
    packed = DSprites(tmp_path, packed=True, factor_sizes=DSPRITES_SIZES)
    assert torch.equal(packed.images_of(ref["classes"][order]), images)


def test_dsprites_missing_wrong_count_wrong_order(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError) as info:
        DSprites(tmp_path / "nowhere")
    message = str(info.value)
    assert str(tmp_path / "nowhere" / DSprites.FILENAME) in message
    assert DSprites.URL in message and "data.dataset.download=true" in message

    write_dsprites(tmp_path / "short", n_drop=1)
    with pytest.raises(DatasetFormatError, match=r"holds 143 images .* prod = 144"):
        DSprites(tmp_path / "short", factor_sizes=DSPRITES_SIZES)

    ref = write_dsprites(tmp_path / "shuffled")
    with np.load(ref["path"], allow_pickle=True) as npz:
        arrays = dict(npz)
    arrays["latents_classes"] = arrays["latents_classes"][::-1]
    np.savez(ref["path"], **arrays)
    with pytest.raises(DatasetFormatError, match="not the full grid"):
        DSprites(tmp_path / "shuffled", factor_sizes=DSPRITES_SIZES)


def test_dsprites_download_with_checksum(tmp_path: Path, monkeypatch) -> None:
    ref = write_dsprites(tmp_path / "upstream")
    monkeypatch.setattr(DSprites, "URL", ref["path"].as_uri())
    md5 = "md5:" + file_checksum(ref["path"], "md5")
    ds = DSprites(tmp_path / "good", download=True, checksum=md5, factor_sizes=DSPRITES_SIZES)
    assert (tmp_path / "good" / DSprites.FILENAME).is_file() and len(ds) == 144
    with pytest.raises(DatasetChecksumError):
        DSprites(tmp_path / "bad", download=True, checksum="md5:" + "f" * 32)
    assert not (tmp_path / "bad" / DSprites.FILENAME).exists()


def test_dsprites_datamodule(tmp_path: Path) -> None:
    write_dsprites(tmp_path)
    dm = GroundTruthDataModule(
        DSprites(tmp_path, factor_sizes=DSPRITES_SIZES), [1, 64, 64], 16, 16, 16
    )
    images, factors = next(iter(dm.train_dataloader()))
    assert images.shape == (16, 1, 64, 64) and factors.shape == (16, 6)


# ---------------------------------------------------------------------- 3D Shapes
@pytest.fixture(scope="module")
def shapes3d_file(tmp_path_factory) -> dict:
    return write_shapes3d(tmp_path_factory.mktemp("shapes3d"))


def test_shapes3d_items_match_file(shapes3d_file: dict) -> None:
    ref, root = shapes3d_file, shapes3d_file["path"].parent
    ds = Shapes3D(root, factor_sizes=SHAPES3D_SIZES, read_block=50)  # several slices
    n = len(ref["classes"])
    assert len(ds) == n and ds.image_shape == (3, 64, 64)
    order = np.random.default_rng(2).permutation(n)[:60]
    images, factors = ds.get_batch(order)
    assert images.dtype == torch.float32 and images.shape == (60, 3, 64, 64)
    assert float(images.min()) >= 0.0 and float(images.max()) <= 1.0
    assert torch.equal(factors, torch.from_numpy(ref["classes"][order]))
    expected = torch.from_numpy(ref["images"][order]).permute(0, 3, 1, 2)
    assert torch.equal(ds.images_u8_of(ref["classes"][order]), expected)
    assert torch.allclose(images, expected.float() / 255.0)
    np.testing.assert_array_equal(ds.values_of(ref["classes"]), ref["labels"])


def test_shapes3d_rechunked_cache_matches_in_memory(shapes3d_file: dict, tmp_path: Path) -> None:
    root = shapes3d_file["path"].parent
    memory = Shapes3D(root, factor_sizes=SHAPES3D_SIZES)
    lazy = Shapes3D(root, in_memory=False, cache_dir=tmp_path, factor_sizes=SHAPES3D_SIZES)
    cache = tmp_path / Shapes3D.CACHE_FILENAME
    with h5py.File(cache, "r") as f:
        assert f["images"].chunks == (1, 64, 64, 3)
    # unsorted, with duplicates: h5py needs increasing indices, the order must come back
    factors = memory.factors_of(np.array([200, 3, 3, 287, 0, 150, 3]))
    assert torch.equal(lazy.images_of(factors), memory.images_of(factors))
    assert lazy.images_of(factors[:0]).shape == (0, 3, 64, 64)
    stamp = cache.stat().st_mtime_ns
    again = Shapes3D(root, in_memory=False, cache_dir=tmp_path, factor_sizes=SHAPES3D_SIZES)
    assert cache.stat().st_mtime_ns == stamp  # reused, not rebuilt
    clone = pickle.loads(pickle.dumps(again))  # spawned workers reopen the file
    assert torch.equal(clone.images_of(factors), memory.images_of(factors))
    loader = DataLoader(lazy, batch_size=32, num_workers=1)  # forked worker, own h5 handle
    images, classes = next(iter(loader))
    assert torch.equal(images, memory.images_of(classes.numpy()))


def test_shapes3d_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError) as info:
        Shapes3D(tmp_path / "none")
    assert str(tmp_path / "none" / "3dshapes.h5") in str(info.value)
    assert Shapes3D.URL in str(info.value)

    write_shapes3d(tmp_path / "short", n_drop=5)
    with pytest.raises(DatasetFormatError, match=r"holds 283 images .* prod = 288"):
        Shapes3D(tmp_path / "short", factor_sizes=SHAPES3D_SIZES)

    ref = write_shapes3d(tmp_path / "unordered")
    with h5py.File(ref["path"], "r+") as f:
        f["labels"][...] = ref["labels"][np.random.default_rng(0).permutation(288)]
    with pytest.raises(DatasetFormatError, match="do not follow the factor grid"):
        Shapes3D(tmp_path / "unordered", factor_sizes=SHAPES3D_SIZES)


def test_shapes3d_download(shapes3d_file: dict, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(Shapes3D, "URL", shapes3d_file["path"].as_uri())
    ds = Shapes3D(tmp_path, download=True, checksum=None, factor_sizes=SHAPES3D_SIZES)
    factors = ds.factors_of(np.arange(5))
    assert torch.equal(
        ds.images_u8_of(factors)[:, :, 0, 0], torch.from_numpy(shapes3d_file["images"][:5, 0, 0])
    )


# ---------------------------------------------------------------------- Falcor3D / Isaac3D
def test_nvidia3d_bases_follow_spec() -> None:
    assert tuple(Falcor3D.FULL_SIZES) == (5, 6, 6, 6, 6, 6, 6)
    assert int(np.prod(Falcor3D.FULL_SIZES)) == 233_280
    assert int(np.prod(Isaac3D.FULL_SIZES)) == 737_280
    bases = np.prod(Isaac3D.FULL_SIZES) // np.cumprod(Isaac3D.FULL_SIZES)
    assert tuple(bases) == (245760, 30720, 6144, 1536, 384, 96, 16, 4, 1)
    assert Isaac3D.factor_names[0] == "object_shape" and Isaac3D.factor_names[-1] == "wall_color"


def test_falcor3d_prepare_and_load(tmp_path: Path) -> None:
    n = int(np.prod(FALCOR_SIZES))
    pngs = write_pngs(tmp_path / "download" / "images", n, side=16)
    out = tmp_path / "data" / "falcor3d_16.npy"
    # --src may be the unzipped folder (with images/) or the images/ folder itself
    nvidia3d.prepare("falcor3d", tmp_path / "download", out, factor_sizes=FALCOR_SIZES)
    array = np.load(out, mmap_mode="r")
    assert array.dtype == np.uint8 and array.shape == (n, 16, 16, 3)
    np.testing.assert_array_equal(array, pngs)  # index order = sorted file names
    ds = Falcor3D(out.parent, resolution=16, factor_sizes=FALCOR_SIZES)
    assert ds.image_shape == (3, 16, 16) and len(ds) == n
    images, factors = ds.get_batch(np.array([11, 0, 5]))
    assert torch.equal(factors, torch.from_numpy(grid_classes(FALCOR_SIZES)[[11, 0, 5]]))
    assert torch.allclose(images, torch.from_numpy(pngs[[11, 0, 5]]).permute(0, 3, 1, 2) / 255)
    assert ds.values_of(factors.numpy()).max() <= 1.0
    clone = pickle.loads(pickle.dumps(ds))  # the memory map is re-opened, not copied
    assert torch.equal(clone.images_of(factors.numpy()), images)

    with pytest.raises(DatasetFormatError, match="expected uint8"):
        Falcor3D(out.parent, resolution=8, filename=out.name, factor_sizes=FALCOR_SIZES)


def test_isaac3d_prepare_downsamples(tmp_path: Path) -> None:
    n = int(np.prod(ISAAC_SIZES))
    pngs = write_pngs(tmp_path / "images", n, side=16, seed=3)
    out = tmp_path / "isaac3d_8.npy"
    nvidia3d.prepare(
        "isaac3d", tmp_path / "images", out, resolution=8, factor_sizes=ISAAC_SIZES, workers=2
    )
    array = np.load(out)
    block_mean = pngs.reshape(n, 8, 2, 8, 2, 3).astype(np.float64).mean(axis=(2, 4))
    assert array.shape == (n, 8, 8, 3)
    assert np.abs(array - block_mean).max() <= 1.0  # area (box) filter
    ds = Isaac3D(tmp_path, resolution=8, factor_sizes=ISAAC_SIZES, in_memory=True)
    np.testing.assert_array_equal(ds.images_hwc_of(ds.factors_of(np.arange(n))), array)


def test_nvidia3d_errors_and_cli(tmp_path: Path, capsys) -> None:
    with pytest.raises(DatasetNotFoundError) as info:
        Isaac3D(tmp_path / "isaac3d")
    message = str(info.value)
    assert str(tmp_path / "isaac3d" / "isaac3d_128.npy") in message
    assert "python -m latentzoo.data.datasets.nvidia3d prepare --name isaac3d" in message
    assert "High-res-disentanglement-datasets" in message

    write_pngs(tmp_path / "pngs", 6, side=8)
    code = nvidia3d.main(
        ["prepare", "--name", "falcor3d", "--src", str(tmp_path / "pngs"), "--out",
         str(tmp_path / "f.npy"), "--resolution", "8"]
    )  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "found 6 PNG files" in err and "233280" in err
    assert not (tmp_path / "f.npy").exists()

    # as a user runs it: one-line error, exit status 2, no runpy warning
    done = subprocess.run(
        [sys.executable, "-m", "latentzoo.data.datasets.nvidia3d", "prepare", "--name",
         "isaac3d", "--src", str(tmp_path / "missing"), "--out", str(tmp_path / "i.npy")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2 and "Warning" not in done.stderr
    assert done.stderr.startswith("error: PNG folder not found: looked for ")

    (tmp_path / "pngs" / "000003.png").rename(tmp_path / "pngs" / "000009.png")
    with pytest.raises(DatasetFormatError, match="numbered PNG names"):
        nvidia3d.prepare(
            "falcor3d", tmp_path / "pngs", tmp_path / "g.npy", factor_sizes=(6,) + (1,) * 6
        )
