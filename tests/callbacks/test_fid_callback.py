"""FIDCallback on a latent cache: without images to score, the reference comes from
``reference_path``; the logged val/fid is the FID of the same samples against that file."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from latentzoo.callbacks.fid import FIDCallback
from latentzoo.metrics.generative import FIDEvaluator, TinyFeatureExtractor, to_uint8
from latentzoo.utils.errors import LatentzooError


class LatentBatches(L.LightningDataModule):
    """Batches of ``{"latent", "label"}`` as from a latent cache, with no source images."""

    def train_dataloader(self) -> DataLoader:
        items = [{"latent": torch.randn(2, 4, 4), "label": torch.tensor(0)} for _ in range(16)]
        return DataLoader(items, batch_size=4)


class LatentGenerator(L.LightningModule):
    """Trains a bias on latents; samples images in [0, 1] (fixed by the seed: lr is 0)."""

    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(2, 1, 1))

    def training_step(self, batch, batch_idx):
        return ((batch["latent"].mean(0) - self.bias) ** 2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)

    def sample(self, n: int, labels=None, sampler=None, steps=None, cfg_scale=None):
        self.last_nfe, self.last_net_forwards = 4, 4
        x = torch.rand(n, 3, 16, 16, device=self.device)
        return (x * 0.6 + self.bias.mean()).clamp(0, 1)


def _fit(callback: FIDCallback, root: Path) -> L.Trainer:
    trainer = L.Trainer(
        max_steps=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback],
        default_root_dir=root,
    )
    trainer.fit(LatentGenerator(), datamodule=LatentBatches())
    return trainer


def _callback(**kwargs) -> FIDCallback:
    return FIDCallback(every_n_steps=2, num_samples=48, batch_size=16, extractor="tiny", **kwargs)


def test_fid_callback_on_latents_uses_reference_path(tmp_path: Path) -> None:
    features = TinyFeatureExtractor()(to_uint8(torch.rand(200, 3, 16, 16))).double().numpy()
    reference = tmp_path / "ref.npz"
    np.savez(reference, mu=features.mean(0), sigma=np.cov(features, rowvar=False))
    trainer = _fit(_callback(reference_path=str(reference)), tmp_path)
    logged = float(trainer.callback_metrics["val/fid"])
    expected = FIDEvaluator(
        num_samples=48,
        batch_size=16,
        extractor="tiny",
        kid=False,
        reference_path=str(reference),
        output_dir=str(tmp_path / "eval"),
    )(LatentGenerator(), None)["fid"]
    assert logged == pytest.approx(expected, rel=1e-6) and logged > 0.01
    assert float(trainer.callback_metrics["val/fid_net_forwards"]) == 4
    assert not list(tmp_path.rglob("fid_stats/*.npz"))  # nothing computed from the data


def test_fid_callback_on_latents_without_reference_path_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(LatentzooError, match="reference_path"):
        _fit(_callback(stats_dir=str(tmp_path / "stats")), tmp_path)
