"""Latent cache on a folder of known PNGs (pixel content encodes the index) with the identity
first stage, whose latent is the image itself: order, flip pairing, counts, manifest, resume,
refusals, sharding over ranks, and the reading side (scale, posterior sample, flips, source)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Dataset, TensorDataset

from latentzoo.cache_latents import cache_latents, run
from latentzoo.data.images import ImageFolderDataModule
from latentzoo.data.latents import LatentDataset, LatentsDataModule, read_manifest
from latentzoo.models.autoencoders import IdentityFirstStage
from latentzoo.models.autoencoders.base import FirstStage
from latentzoo.utils.errors import LatentzooError
from tests.conftest import ROOT, compose_config

N, SIZE = 23, 8  # 23 images: not a multiple of the batch (3) nor of the shard size (5)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_images(n: int = 12) -> TensorDataset:
    """Random float images with a dark left half and labels i % 3 (also used by
    tests/data/test_resumable_loaders.py to build a latent cache)."""
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(n, 3, 8, 8, generator=gen)
    images[:, :, :, :4] *= 0.2
    return TensorDataset(images, torch.arange(n) % 3)


def image_array(i: int) -> np.ndarray:
    """Image i: red = 10·i (the index), green rises left to right (a flip reverses it)."""
    a = np.zeros((SIZE, SIZE, 3), np.uint8)
    a[..., 0] = 10 * i
    a[..., 1] = np.arange(SIZE)[None, :] * 30
    a[..., 2] = np.arange(SIZE)[:, None] * 20 + (i % 3)
    return a


def expected(i: int) -> np.ndarray:
    """Image i as the first stage sees it: [3, H, W] in [-1, 1]."""
    return image_array(i).transpose(2, 0, 1).astype(np.float32) / 255 * 2 - 1


@pytest.fixture
def pngs(tmp_path: Path) -> Path:
    root = tmp_path / "pngs"
    root.mkdir()
    for i in range(N):
        Image.fromarray(image_array(i)).save(root / f"{i:03d}.png")
    return root


def cache_cfg(root: Path, out: Path, tmp_path: Path, *extra: str):
    return compose_config(
        "cache_latents",
        [
            "data=image_folder",
            f"data.root={root}",
            f"data.image_size={SIZE}",
            "data.num_workers=0",
            "model/autoencoder=identity",
            f"out={out}",
            "shard_size=5",
            "batch_size=3",
            "device=cpu",
            *extra,
        ],
        tmp_path,
    )


def folder_dataset(root: Path) -> Dataset:
    return ImageFolderDataModule(str(root), image_size=SIZE).reference_dataset("train")


def files_of(folder: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(folder.iterdir()) if f.is_file()}


class ConstantStd(FirstStage):
    """mean = x, std = 0.25 everywhere: a first stage with a known posterior."""

    name = "constant_std"

    def __init__(self, scale_factor: float = 0.5) -> None:
        super().__init__()
        self.latent_channels, self.scale_factor = 3, scale_factor

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x, torch.full_like(x, 0.25)


class Interrupted(Dataset):
    """The source images, raising at item ``fail_at`` (a crash mid-run); counts reads."""

    def __init__(self, dataset: Dataset, fail_at: int | None = None) -> None:
        self.dataset, self.fail_at, self.read = dataset, fail_at, []

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        if i == self.fail_at:
            raise RuntimeError("killed")
        self.read.append(i)
        return self.dataset[i]


def test_every_image_once_in_order_with_its_flip_apart(pngs: Path, tmp_path: Path) -> None:
    out = tmp_path / "cache"
    manifest = run(cache_cfg(pngs, out, tmp_path))
    raw = LatentDataset(out)
    assert len(raw) == N and manifest["count"] == N
    for i in range(N):
        mean, std, label = raw.raw(i, "image")
        flip_mean, flip_std, _ = raw.raw(i, "flip")
        assert mean.dtype == np.float16 and label == 0
        np.testing.assert_allclose(mean, expected(i), atol=2e-3)  # order: item i is image i
        np.testing.assert_allclose(flip_mean, expected(i)[..., ::-1], atol=2e-3)  # its flip
        assert not np.allclose(flip_mean, mean, atol=0.1)
        assert np.all(std == 0) and np.all(flip_std == 0)
    on_disk = read_manifest(out)
    assert on_disk == manifest and on_disk["complete"]
    assert on_disk["counts"] == {"image": N, "flip": N} and on_disk["num_shards"] == 5
    assert on_disk["flips"] is True and on_disk["precision"] == "fp32"
    assert on_disk["autoencoder"]["name"] == "identity"
    assert on_disk["autoencoder"]["scale_factor"] == 1.0
    assert on_disk["image_shape"] == on_disk["latent_shape"] == [3, SIZE, SIZE]
    source = on_disk["source"]
    assert source["split"] == "train" and source["info"]["split_size"] == N
    assert source["data"]["_target_"] == "latentzoo.data.images.ImageFolderDataModule"
    assert source["data"]["root"] == str(pngs) and source["data"]["image_size"] == SIZE
    assert len(list(out.glob("shard_*.npy"))) == 5 * 5  # 4 orientation parts + labels


def test_split_and_flips_options(pngs: Path, tmp_path: Path) -> None:
    out = tmp_path / "val"
    cfg = cache_cfg(pngs, out, tmp_path, "split=val", "flips=false", "data.val_size=4")
    manifest = run(cfg)
    assert manifest["count"] == 4 and manifest["counts"] == {"image": 4, "flip": 0}
    assert not list(out.glob("*.flip.*"))
    raw = LatentDataset(out, flip_p=0.0)
    for j, i in enumerate(range(N - 4, N)):  # val = the last 4 files of the flat pool
        np.testing.assert_allclose(raw.raw(j)[0], expected(i), atol=2e-3)
    with pytest.raises(LatentzooError, match="no flips"):
        LatentDataset(out, flip_p=0.5)


def test_read_applies_scale_posterior_sample_and_flip_p(pngs: Path, tmp_path: Path) -> None:
    cache_latents(folder_dataset(pngs), ConstantStd(0.5), tmp_path / "c", [3, SIZE, SIZE])
    i, draws = 7, 3000
    x = torch.from_numpy(expected(i))
    mean_only = LatentDataset(tmp_path / "c", flip_p=0.0, sample=False)
    torch.testing.assert_close(mean_only[i]["latent"], 0.5 * x, atol=1e-3, rtol=0)
    flipped = LatentDataset(tmp_path / "c", flip_p=1.0, sample=False)
    torch.testing.assert_close(flipped[i]["latent"], 0.5 * x.flip(-1), atol=1e-3, rtol=0)

    z = torch.stack([LatentDataset(tmp_path / "c", flip_p=0.0)[i]["latent"] for _ in range(draws)])
    # z = scale·(μ + σ·ε): mean 0.5·x, std 0.5·0.25 in every pixel
    assert (z.mean(0) - 0.5 * x).abs().max() < 5 * 0.125 / draws**0.5
    assert (z.std(0) - 0.125).abs().max() < 0.02

    half = LatentDataset(tmp_path / "c", flip_p=0.5, sample=False)
    picks = torch.stack([half[i]["latent"] for _ in range(400)])
    is_flip = (picks[:, 1, 0, 0] > picks[:, 1, 0, -1]).float()  # green falls left to right
    assert 0.4 < is_flip.mean() < 0.6

    dm = LatentsDataModule(str(tmp_path / "c"), [3, SIZE, SIZE], 0, batch_size=4, val_size=3)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"latent", "label"} and batch["latent"].shape == (4, 3, SIZE, SIZE)
    assert len(dm.train_dataset) == N - 3 and len(dm.val_dataset) == 3
    first = [dm.val_dataset[j]["latent"] for j in range(3)]
    assert all(torch.equal(a, dm.val_dataset[j]["latent"]) for j, a in enumerate(first))


class AutocastProbe(IdentityFirstStage):
    """Identity that records whether the encoder ran under bf16 autocast."""

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.seen = (torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"))
        return super().encode(x)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_encoding_precision(precision: str, pngs: Path, tmp_path: Path) -> None:
    probe = AutocastProbe(3)
    manifest = cache_latents(
        folder_dataset(pngs), probe, tmp_path, [3, SIZE, SIZE], precision=precision, limit=2
    )
    assert manifest["precision"] == precision and manifest["count"] == 2
    assert probe.seen[0] == (precision == "bf16")
    assert probe.seen[1] == torch.bfloat16 or precision == "fp32"
    with pytest.raises(LatentzooError, match="precision"):
        cache_latents(folder_dataset(pngs), probe, tmp_path / "x", [3, SIZE, SIZE], precision="fp8")


def test_float_images_and_labels(tmp_path: Path) -> None:
    data = tiny_images(7)
    cache_latents(data, IdentityFirstStage(3), tmp_path, [3, 8, 8], num_classes=3, shard_size=4)
    raw = LatentDataset(tmp_path)
    for i in range(7):
        mean, _, label = raw.raw(i)
        assert label == i % 3
        np.testing.assert_allclose(mean, data[i][0].numpy() * 2 - 1, atol=2e-3)


def test_resume_after_an_interruption_equals_an_uninterrupted_run(
    pngs: Path, tmp_path: Path
) -> None:
    args = {"image_shape": [3, SIZE, SIZE], "batch_size": 3, "shard_size": 5}
    cache_latents(folder_dataset(pngs), IdentityFirstStage(3), tmp_path / "whole", **args)
    crashing = Interrupted(folder_dataset(pngs), fail_at=12)
    with pytest.raises(RuntimeError, match="killed"):
        cache_latents(crashing, IdentityFirstStage(3), tmp_path / "resumed", **args)
    assert not json.loads((tmp_path / "resumed" / "manifest.json").read_text())["complete"]
    with pytest.raises(LatentzooError, match="incomplete"):
        read_manifest(tmp_path / "resumed")
    again = Interrupted(folder_dataset(pngs))
    cache_latents(again, IdentityFirstStage(3), tmp_path / "resumed", **args)
    assert sorted(again.read) == list(range(10, N))  # shards 0 and 1 were kept
    assert files_of(tmp_path / "resumed") == files_of(tmp_path / "whole")


def test_a_cache_of_another_config_is_refused_unless_overwrite(pngs: Path, tmp_path: Path) -> None:
    out = tmp_path / "cache"
    run(cache_cfg(pngs, out, tmp_path))
    assert run(cache_cfg(pngs, out, tmp_path))["complete"]  # same command: nothing to do
    scaled = cache_cfg(pngs, out, tmp_path, "model.autoencoder.scale_factor=2.0")
    with pytest.raises(LatentzooError, match="overwrite=true"):
        run(scaled)
    for other in ("data.val_size=2", "precision=bf16", "split=val", "flips=false"):
        with pytest.raises(LatentzooError, match="another autoencoder/data"):
            run(cache_cfg(pngs, out, tmp_path, other))
    assert run(cache_cfg(pngs, out, tmp_path, "data.num_workers=2"))["complete"]  # loader only
    run(cache_cfg(pngs, out, tmp_path, "model.autoencoder.scale_factor=2.0", "overwrite=true"))
    assert read_manifest(out)["autoencoder"]["scale_factor"] == 2.0
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["format"] = "latentzoo-latents-v1"
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(LatentzooError, match="re-encode"):
        read_manifest(out)


def test_two_ranks_write_what_one_rank_writes(pngs: Path, tmp_path: Path) -> None:
    args = {"image_shape": [3, SIZE, SIZE], "batch_size": 3, "shard_size": 5}
    cache_latents(folder_dataset(pngs), IdentityFirstStage(3), tmp_path / "one", **args)
    barrier = threading.Barrier(2, timeout=60)
    datasets = [Interrupted(folder_dataset(pngs)) for _ in range(2)]
    errors: list[BaseException] = []

    def rank(r: int) -> None:
        try:
            cache_latents(
                datasets[r],
                IdentityFirstStage(3),
                tmp_path / "two",
                **args,
                rank=r,
                world_size=2,
                barrier=barrier.wait,
            )
        except BaseException as error:  # surfaced below
            errors.append(error)

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    # 5 shards: rank 0 encodes shards 0-1 (items 0-9), rank 1 shards 2-4 (items 10-22)
    assert sorted(datasets[0].read) == list(range(10))
    assert sorted(datasets[1].read) == list(range(10, N))
    assert files_of(tmp_path / "two") == files_of(tmp_path / "one")


@pytest.mark.slow
@pytest.mark.parametrize("launch", ["torchrun", "trainer=ddp_sim"])
def test_two_processes_equal_one_process(launch: str, pngs: Path, tmp_path: Path) -> None:
    common = [
        "data=image_folder",
        f"data.root={pngs}",
        f"data.image_size={SIZE}",
        "data.num_workers=0",
        "model/autoencoder=identity",
        "shard_size=5",
        "batch_size=3",
        f"paths.log_dir={tmp_path / 'logs'}",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    module = [sys.executable, "-m", "latentzoo.cache_latents"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    two = (
        [*torchrun, "--master_port", "29517", *module[1:], *common]
        if launch == "torchrun"
        else [*module, *common, "trainer=ddp_sim"]
    )
    for cmd, out in (([*module, *common], "one"), (two, "two")):
        done = subprocess.run(
            [*cmd, f"out={tmp_path / out}"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr[-3000:]
    assert "rank 1/2 encodes shards 2..4" in done.stdout + done.stderr  # a second process ran
    assert files_of(tmp_path / "two") == files_of(tmp_path / "one")


def test_source_images_give_the_fid_reference(pngs: Path, tmp_path: Path) -> None:
    out = tmp_path / "cache"
    run(cache_cfg(pngs, out, tmp_path))
    dm = LatentsDataModule(str(out), [3, SIZE, SIZE], 0, batch_size=4)
    source = ImageFolderDataModule(str(pngs), image_size=SIZE)
    assert dm.reference_info("train") == source.reference_info("train")
    ours = torch.cat([x for x, _ in dm.reference_dataloader("train", batch_size=4)])
    theirs = torch.cat([x for x, _ in source.reference_dataloader("train", batch_size=4)])
    assert torch.equal(ours, theirs) and ours.shape[0] == N
    half = torch.cat([x for x, _ in dm.reference_dataloader("train", 4, rank=1, world_size=2)])
    assert half.shape[0] == N // 2
    shutil.rmtree(pngs)
    gone = LatentsDataModule(str(out), [3, SIZE, SIZE], 0)
    with pytest.raises(LatentzooError, match="metrics.fid.reference_path"):
        gone.reference_dataloader("train")


def test_val_path_and_training_from_latents(pngs: Path, tmp_path: Path) -> None:
    run(cache_cfg(pngs, tmp_path / "train", tmp_path, "data.val_size=4"))
    run(cache_cfg(pngs, tmp_path / "val", tmp_path, "data.val_size=4", "split=val"))
    from latentzoo.models import LatentFlowMatching
    from latentzoo.models.nets.dit import DiT

    dm = LatentsDataModule(
        str(tmp_path / "train"), [3, SIZE, SIZE], 0, batch_size=4, val_path=str(tmp_path / "val")
    )
    dm.setup("fit")
    assert len(dm.train_dataset) == N - 4 and len(dm.val_dataset) == 4  # all cached items train

    def model(scale: float) -> LatentFlowMatching:
        net = DiT(3, SIZE, 0, 0.0, size=None, depth=1, hidden_size=32, num_heads=2)
        return LatentFlowMatching(net, IdentityFirstStage(3, scale), [3, SIZE, SIZE])

    trainer_args = {
        "accelerator": "cpu",
        "max_steps": 2,
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "default_root_dir": tmp_path,
        "limit_val_batches": 1,
    }
    trainer = L.Trainer(**trainer_args)
    trainer.fit(model(1.0), dm)
    assert trainer.global_step == 2
    with pytest.raises(LatentzooError, match="encoded by"):
        L.Trainer(**trainer_args).fit(model(2.0), dm)
    with pytest.raises(LatentzooError, match="num_classes"):
        LatentsDataModule(str(tmp_path / "train"), [3, SIZE, SIZE], num_classes=3)
