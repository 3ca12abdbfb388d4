"""The EMA contract for every model that averages weights (latent_fm, nfpi), through the real
Trainer and checkpoint callback: ``state_dict`` holds the raw weights at every save, the average
lives in ``checkpoint["ema"]``, resume continues from the raw weights, and a checkpoint without
an average starts one from the loaded weights (never from the initialisation)."""

from __future__ import annotations

from pathlib import Path

import hydra
import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from latentzoo.utils.distributed import resolve_batch_size
from tests.conftest import TINY_NFPI, compose_config

MODELS = {
    "latent_fm": (
        "net.",
        [
            "experiment=latent_fm_proc_blobs",
            "data.image_size=16",
            "data.batch_size=8",
            "data.num_val=16",
            "model.ema_decay=0.5",
            "model.ema_warmup=false",
        ],
    ),
    "nfpi": (
        "flow.",
        [*TINY_NFPI, "model.ema_decay=0.5"],
    ),
}


def build(name: str, tmp_path: Path):
    _, overrides = MODELS[name]
    cfg = compose_config("train", overrides, tmp_path)
    torch.manual_seed(0)
    return hydra.utils.instantiate(cfg.model), hydra.utils.instantiate(
        resolve_batch_size(cfg.data, 1)
    )


def trainer(tmp_path: Path, steps: int, callbacks: list) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        val_check_interval=2,
        check_val_every_n_epoch=None,
        limit_val_batches=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=callbacks,
    )


def raw(module: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items() if k.startswith(prefix)}


class RawWeightsAtSave(L.Callback):
    """Compares every saved ``state_dict`` with the raw weights of the last training step."""

    def __init__(self, prefix: str) -> None:
        self.prefix, self.raw, self.saves, self.mismatches = prefix, {}, 0, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.raw = raw(pl_module, self.prefix)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        self.saves += 1
        saved = checkpoint["state_dict"]
        self.mismatches += [k for k, v in self.raw.items() if not torch.equal(saved[k], v)]


class WeightsAtTrainStart(L.Callback):
    def on_train_start(self, trainer, pl_module) -> None:
        self.raw = raw(pl_module, "")
        self.ema = {k: v.clone() for k, v in pl_module.ema.shadow.items()}
        self.ema_updates = pl_module.ema.num_updates


@pytest.mark.parametrize("name", sorted(MODELS))
def test_checkpoints_hold_raw_weights_and_resume_continues_from_them(
    name: str, tmp_path: Path
) -> None:
    prefix, _ = MODELS[name]
    model, data = build(name, tmp_path)
    probe = RawWeightsAtSave(prefix)
    saver = ModelCheckpoint(tmp_path / "ckpt", monitor="val/loss", save_last=True)
    trainer(tmp_path, 4, [probe, saver]).fit(model, datamodule=data)
    assert probe.saves >= 2 and probe.mismatches == []  # saves at validation too
    checkpoint = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    averaged = checkpoint["ema"]["shadow"]
    assert any(not torch.equal(averaged[k[len(prefix) :]], v) for k, v in probe.raw.items())

    resumed, data = build(name, tmp_path)
    start = WeightsAtTrainStart()
    trainer(tmp_path, 5, [start]).fit(
        resumed, datamodule=data, ckpt_path=tmp_path / "ckpt" / "last.ckpt", weights_only=False
    )
    for key, value in checkpoint["state_dict"].items():
        assert torch.equal(start.raw[key], value), key
    assert start.ema_updates == checkpoint["ema"]["num_updates"]
    for key, value in start.ema.items():
        assert torch.equal(value, averaged[key]), key


@pytest.mark.parametrize("name", sorted(MODELS))
def test_a_checkpoint_without_ema_starts_the_average_at_the_loaded_weights(
    name: str, tmp_path: Path
) -> None:
    prefix, _ = MODELS[name]
    model, data = build(name, tmp_path)
    saver = ModelCheckpoint(tmp_path / "ckpt", save_last=True)
    trainer(tmp_path, 3, [saver]).fit(model, datamodule=data)
    checkpoint = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    del checkpoint["ema"]
    torch.save(checkpoint, tmp_path / "no_ema.ckpt")
    loaded = {
        k[len(prefix) :]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)
    }

    # eval.py's order: on_load_checkpoint, then load_state_dict
    evaluated, _ = build(name, tmp_path)
    evaluated.on_load_checkpoint(checkpoint)
    evaluated.load_state_dict(checkpoint["state_dict"])
    for key, value in evaluated.ema.shadow.items():
        assert torch.equal(value, loaded[key]), key

    # Lightning's resume
    resumed, data = build(name, tmp_path)
    start = WeightsAtTrainStart()
    trainer(tmp_path, 4, [start]).fit(
        resumed, datamodule=data, ckpt_path=tmp_path / "no_ema.ckpt", weights_only=False
    )
    for key, value in start.ema.items():
        assert torch.equal(value, loaded[key]), key
