"""Lean latent_fm checkpoints: the frozen first stage is rebuilt from its config and checked by
fingerprint, not stored; older checkpoints that hold it still load; resume stays strict."""

from __future__ import annotations

import functools
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from latentzoo.models import KLAutoencoder, LatentFlowMatching
from latentzoo.models.autoencoders import KLAutoencoderNet, KLFirstStage
from latentzoo.models.nets.dit import DiT
from latentzoo.utils.checkpoint import CHECKPOINT_KEY
from latentzoo.utils.errors import CheckpointError

TINY_DIT = functools.partial(DiT, size=None, depth=1, hidden_size=32, num_heads=2, patch_size=2)
NET_CFG = {
    "_target_": "latentzoo.models.autoencoders.KLAutoencoderNet",
    "in_channels": 3,
    "z_channels": 3,
    "ch": 8,
    "ch_mult": [1, 2],
    "num_res_blocks": 1,
}


def kl_checkpoint(path: Path, seed: int) -> str:
    """A ``model=kl_autoencoder`` checkpoint with random weights (as training would write)."""
    torch.manual_seed(seed)
    import hydra

    model = KLAutoencoder(hydra.utils.instantiate(NET_CFG))
    cfg = {"model": {"_target_": "latentzoo.models.KLAutoencoder", "net": NET_CFG}}
    torch.save({"state_dict": model.state_dict(), CHECKPOINT_KEY: {"config": cfg}}, path)
    return str(path)


def build(stage: KLFirstStage, seed: int = 0, **kwargs) -> LatentFlowMatching:
    torch.manual_seed(seed)
    return LatentFlowMatching(
        TINY_DIT,
        stage,
        [3, 8, 8],
        ema_decay=0.9,
        sampler={"name": "euler", "steps": 2},
        optimizer=functools.partial(torch.optim.AdamW, lr=1e-2),
        **kwargs,
    )


def fit(model, root: Path, steps: int, ckpt_path: Path | None = None, callbacks=()):
    images = torch.rand(16, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    loader = DataLoader(TensorDataset(images, torch.zeros(16, dtype=torch.long)), batch_size=8)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=root,
        callbacks=list(callbacks),
    )
    trainer.fit(model, loader, ckpt_path=ckpt_path, weights_only=False)
    return trainer


@pytest.fixture
def stage_file(tmp_path: Path) -> str:
    return kl_checkpoint(tmp_path / "kl.ckpt", seed=1)


def test_checkpoint_leaves_the_first_stage_out_and_records_its_fingerprint(
    tmp_path: Path, stage_file: str
) -> None:
    model = build(KLFirstStage(ckpt_path=stage_file, scale_factor=0.5))
    trainer = fit(model, tmp_path, 2)
    trainer.save_checkpoint(tmp_path / "lean.ckpt")
    checkpoint = torch.load(tmp_path / "lean.ckpt", weights_only=False)
    keys = checkpoint["state_dict"]
    assert keys and not any(k.startswith("first_stage.") for k in keys)
    assert any(k.startswith("net.") for k in keys)
    saved = checkpoint["latent_fm"]["first_stage"]
    assert saved["fingerprint"] == model.first_stage.fingerprint() > 0
    assert (saved["class"], saved["scale_factor"]) == ("KLFirstStage", 0.5)

    # eval.py's order: rebuilt from the config, checked, then the lean weights
    fresh = build(KLFirstStage(ckpt_path=stage_file, scale_factor=0.5), seed=5)
    fresh.on_load_checkpoint(checkpoint)
    fresh.load_state_dict(checkpoint["state_dict"])
    noise = torch.randn(2, 3, 4, 4)
    assert torch.equal(fresh.sample(2, noise=noise), model.sample(2, noise=noise))

    # a missing net key still fails the strict load
    broken = dict(checkpoint["state_dict"])
    del broken[next(k for k in broken if k.startswith("net."))]
    with pytest.raises(RuntimeError, match="Missing key"):
        build(KLFirstStage(ckpt_path=stage_file, scale_factor=0.5)).load_state_dict(broken)


@pytest.mark.parametrize("change", ["weights", "scale"])
def test_a_different_first_stage_is_refused(tmp_path: Path, stage_file: str, change: str) -> None:
    model = build(KLFirstStage(ckpt_path=stage_file, scale_factor=0.5))
    checkpoint = {"state_dict": model.state_dict()}
    model.on_save_checkpoint(checkpoint)
    other_file = kl_checkpoint(tmp_path / "other.ckpt", seed=2)
    other = KLFirstStage(
        ckpt_path=other_file if change == "weights" else stage_file,
        scale_factor=0.5 if change == "weights" else 0.18215,
    )
    with pytest.raises(CheckpointError, match="first stage .* point model.autoencoder"):
        build(other).on_load_checkpoint(checkpoint)


def test_a_checkpoint_holding_the_first_stage_still_loads(tmp_path: Path, stage_file: str) -> None:
    """Checkpoints written before lean saving hold ``first_stage.*``: those weights are used."""
    model = build(KLFirstStage(ckpt_path=stage_file))
    old = {
        "state_dict": torch.nn.Module.state_dict(model),
        "latent_fm": {"num_classes": 0, "null_label": None, "first_stage": "kl_f4:old.ckpt"},
    }
    assert any(k.startswith("first_stage.") for k in old["state_dict"])
    other = build(KLFirstStage(ckpt_path=kl_checkpoint(tmp_path / "o.ckpt", seed=3)))
    other.on_load_checkpoint(old)
    other.load_state_dict(old["state_dict"])
    assert other.first_stage.fingerprint() == model.first_stage.fingerprint()


def test_a_random_first_stage_is_stored(tmp_path: Path) -> None:
    """Without a weights file the config cannot rebuild the stage: it stays in the checkpoint."""
    random_stage = KLFirstStage(net=KLAutoencoderNet(3, 3, 8, [1, 2], 1))
    model = build(random_stage)
    assert any(k.startswith("first_stage.") for k in model.state_dict())
    checkpoint = {"state_dict": model.state_dict()}
    model.on_save_checkpoint(checkpoint)
    other = build(KLFirstStage(net=KLAutoencoderNet(3, 3, 8, [1, 2], 1)), seed=9)
    other.on_load_checkpoint(checkpoint)  # no refusal: the stored weights replace the live ones
    other.load_state_dict(checkpoint["state_dict"])
    assert other.first_stage.fingerprint() == random_stage.fingerprint()


def test_lightning_resume_from_a_lean_checkpoint_is_strict_and_exact(
    tmp_path: Path, stage_file: str
) -> None:
    model = build(KLFirstStage(ckpt_path=stage_file, scale_factor=0.5))
    trainer = fit(model, tmp_path / "a", 2)
    trainer.save_checkpoint(tmp_path / "lean.ckpt")
    checkpoint = torch.load(tmp_path / "lean.ckpt", weights_only=False)

    class AtStart(L.Callback):
        def on_train_start(self, trainer, pl_module) -> None:
            self.state = {k: v.clone() for k, v in pl_module.state_dict().items()}
            self.ema = {k: v.clone() for k, v in pl_module.ema.shadow.items()}

    resumed = build(KLFirstStage(ckpt_path=stage_file, scale_factor=0.5), seed=7)
    probe = AtStart()
    trainer = fit(resumed, tmp_path / "b", 3, tmp_path / "lean.ckpt", [probe])
    assert trainer.global_step == 3
    for key, value in checkpoint["state_dict"].items():
        assert torch.equal(probe.state[key], value), key
    for key, value in checkpoint["ema"]["shadow"].items():
        assert torch.equal(probe.ema[key], value), key
    assert resumed.first_stage.fingerprint() == model.first_stage.fingerprint()

    mismatched = build(KLFirstStage(ckpt_path=kl_checkpoint(tmp_path / "x.ckpt", 4)))
    with pytest.raises(CheckpointError, match="fingerprint"):
        fit(mismatched, tmp_path / "c", 3, ckpt_path=tmp_path / "lean.ckpt")
