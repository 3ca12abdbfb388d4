"""Latent cache: encode with flips -> shards + manifest -> LatentsDataModule batches."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf, open_dict
from torch.utils.data import DataLoader, TensorDataset

from latentzoo.cache_latents import cache_latents, run
from latentzoo.data.latents import LatentDataset, LatentsDataModule
from latentzoo.models.autoencoders import IdentityFirstStage, KLAutoencoderNet, KLFirstStage
from latentzoo.utils.errors import LatentzooError
from tests.conftest import compose_config


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_images(n: int = 12) -> TensorDataset:
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(n, 3, 8, 8, generator=gen)
    images[:, :, :, :4] *= 0.2  # left half dark: a flip is visible
    return TensorDataset(images, torch.arange(n) % 3)


class TinyImageDataModule(L.LightningDataModule):
    """In-test image datamodule with the interface of latentzoo's image datamodules."""

    def __init__(self, n: int = 12, batch_size: int = 4) -> None:
        super().__init__()
        self.image_shape, self.num_classes, self.batch_size = [3, 8, 8], 3, batch_size
        self.n = n

    def setup(self, stage: str | None = None) -> None:
        self.train_dataset = tiny_images(self.n)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_dataset, batch_size=self.batch_size, shuffle=True)


def test_identity_round_trip_with_flips(tmp_path: Path) -> None:
    data = tiny_images()
    manifest = cache_latents(
        data, IdentityFirstStage(3), tmp_path, [3, 8, 8], num_classes=3, batch_size=5, shard_size=5
    )
    assert manifest["count"] == 12 and len(manifest["shards"]) == 3 and manifest["complete"]
    assert manifest["latent_shape"] == [3, 8, 8]
    assert json.loads((tmp_path / "manifest.json").read_text())["autoencoder"]["name"] == "identity"
    raw = LatentDataset(tmp_path)
    for i in (0, 6, 11):
        mean, std, label = raw.raw(i)
        x = data[i][0] * 2 - 1
        assert np.allclose(mean[0], x.numpy(), atol=1e-3)
        assert np.allclose(mean[1], x.flip(-1).numpy(), atol=1e-3)
        assert np.all(std == 0) and label == i % 3 and mean.dtype == np.float16

    dm = LatentsDataModule(str(tmp_path), [3, 8, 8], num_classes=3, batch_size=4, val_size=2)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["latent"].shape == (4, 3, 8, 8) and batch["label"].dtype == torch.long
    assert len(dm.train_dataset) == 10 and len(dm.val_dataset) == 2
    # flips are drawn with p = 0.5: the left half is the dark side only without the flip
    draws = torch.stack([raw[0]["latent"] for _ in range(400)])
    flips = (draws[..., :4].mean((1, 2, 3)) > draws[..., 4:].mean((1, 2, 3))).float().numpy()
    assert abs(np.mean(flips) - 0.5) < 0.1


def test_kl_cache_resamples_and_checks_the_autoencoder(tmp_path: Path) -> None:
    torch.manual_seed(0)
    stage = KLFirstStage(net=KLAutoencoderNet(3, 3, 8, [1, 2], 1), scale_factor=0.5)
    data = tiny_images(6)
    cache_latents(data, stage, tmp_path, [3, 8, 8], num_classes=3, batch_size=4, shard_size=4)
    raw = LatentDataset(tmp_path, flip_p=0.0)
    mean, std = stage.encode(data[2][0][None] * 2 - 1)
    cached_mean, cached_std, _ = raw.raw(2)
    assert np.allclose(cached_mean[0], mean[0].numpy(), atol=2e-3, rtol=2e-3)
    assert np.allclose(cached_std[0], std[0].numpy(), atol=2e-3, rtol=2e-3)
    draws = torch.stack([raw[2]["latent"] for _ in range(2000)])
    assert not torch.equal(draws[0], draws[1])  # a fresh z at every access
    expected_mean = 0.5 * torch.from_numpy(cached_mean[0].astype(np.float32))
    expected_std = 0.5 * torch.from_numpy(cached_std[0].astype(np.float32))
    assert torch.allclose(
        draws.mean(0), expected_mean, atol=4 * float(expected_std.max()) / 2000**0.5
    )
    assert torch.allclose(draws.std(0), expected_std, rtol=0.1)

    dm = LatentsDataModule(str(tmp_path), [3, 8, 8], num_classes=3, val_size=1)
    dm.check_autoencoder(stage)  # same weights: accepted
    other = KLFirstStage(net=KLAutoencoderNet(3, 3, 8, [1, 2], 1), scale_factor=0.5)
    with pytest.raises(LatentzooError, match="encoded by"):
        dm.check_autoencoder(other)
    with pytest.raises(LatentzooError, match="encoded by"):
        dm.check_autoencoder(IdentityFirstStage(3))
    with pytest.raises(LatentzooError, match="num_classes"):
        LatentsDataModule(str(tmp_path), [3, 8, 8], num_classes=0)
    # a second run is a no-op; another autoencoder into the same folder is refused
    assert cache_latents(data, stage, tmp_path, [3, 8, 8], num_classes=3)["count"] == 6
    with pytest.raises(LatentzooError, match="overwrite"):
        cache_latents(data, other, tmp_path, [3, 8, 8], num_classes=3)


def test_resume_after_finished_shards(tmp_path: Path) -> None:
    data = tiny_images(10)
    cache_latents(
        data, IdentityFirstStage(3), tmp_path, [3, 8, 8], 3, batch_size=2, shard_size=4, limit=4
    )
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["complete"] = False  # as if interrupted after the first shard
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    done = cache_latents(
        data, IdentityFirstStage(3), tmp_path, [3, 8, 8], 3, batch_size=2, shard_size=4
    )
    assert done["count"] == 10 and [s["count"] for s in done["shards"]] == [4, 4, 2]
    assert np.allclose(LatentDataset(tmp_path).raw(9)[0][0], data[9][0].numpy() * 2 - 1, atol=1e-3)


def test_hydra_entry_and_training_from_latents(tmp_path: Path) -> None:
    cfg = compose_config(
        "cache_latents",
        ["data=proc_dsprites", "model/autoencoder=identity", f"out={tmp_path / 'cache'}"],
        tmp_path,
    )
    with open_dict(cfg):  # an in-test image datamodule instead of a real data config
        cfg.data = OmegaConf.create({"_target_": f"{__name__}.TinyImageDataModule", "n": 12})
        cfg.model.autoencoder.channels = 3
    assert run(cfg)["count"] == 12

    from latentzoo.models import LatentFlowMatching
    from latentzoo.models.nets.dit import DiT

    model = LatentFlowMatching(
        DiT(3, 8, 3, 0.1, size=None, depth=1, hidden_size=32, num_heads=2),
        IdentityFirstStage(3),
        [3, 8, 8],
        num_classes=3,
        label_dropout=0.1,
    )
    dm = LatentsDataModule(str(tmp_path / "cache"), [3, 8, 8], 3, batch_size=4, val_size=2)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=2,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
        limit_val_batches=1,
    )
    trainer.fit(model, dm)
    assert trainer.global_step == 2 and model.ema.num_updates == 2
    wrong = LatentFlowMatching(
        DiT(3, 8, 3, 0.1, size=None, depth=1, hidden_size=32, num_heads=2),
        IdentityFirstStage(3, scale_factor=2.0),
        [3, 8, 8],
        num_classes=3,
        label_dropout=0.1,
    )
    with pytest.raises(LatentzooError, match="encoded by"):
        L.Trainer(
            accelerator="cpu",
            max_steps=1,
            logger=False,
            enable_progress_bar=False,
            enable_checkpointing=False,
            default_root_dir=tmp_path,
        ).fit(wrong, dm)
