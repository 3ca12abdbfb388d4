"""Tiny single runs and ensembles through ``latentzoo.train.train``, and their final weights."""

from __future__ import annotations

from pathlib import Path

import torch

from latentzoo.train import train
from tests.conftest import TINY_DATA, compose_config

STEPS = 3
TINY_RUN = [
    *TINY_DATA,
    "trainer.accelerator=cpu",
    f"trainer.max_steps={STEPS}",
    "trainer.val_check_interval=null",
    "trainer.limit_val_batches=0",
    "trainer.limit_test_batches=1",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "extras.print_config=false",
    "test=false",
    "callbacks=none",
    "+callbacks.model_checkpoint._target_=latentzoo.callbacks.Checkpoints",
    "+callbacks.model_checkpoint.dirpath=${paths.output_dir}/checkpoints",
    "+callbacks.model_checkpoint.save_last=true",
    "+callbacks.model_checkpoint.every_n_train_steps=null",
]
# small nets keep the equivalence tests fast; the same for both sides
SMALL_NETS = {
    "beta_vae": ["model.encoder.hidden=32", "model.decoder.hidden=32"],
    "beta_tcvae": ["model.encoder.hidden=32", "model.decoder.hidden=32"],
    "factor_vae": [
        "model.encoder.hidden=32",
        "model.decoder.hidden=32",
        "model.discriminator.hidden=32",
        "model.discriminator.num_layers=2",
    ],
    "lie_vae": ["model.encoder.hidden=32", "model.decoder.hidden=32"],
}


def model_overrides(model: str) -> list[str]:
    return [f"model={model}", *SMALL_NETS[model]]


def run(tmp: Path, overrides: list[str]) -> Path:
    cfg = compose_config("train", [*TINY_RUN, *overrides], tmp)
    train(cfg)
    return tmp


def load(ckpt: Path) -> dict:
    return torch.load(ckpt, map_location="cpu", weights_only=False)


def weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return load(ckpt)["state_dict"]


def member_ckpt(root: Path, seed: int) -> Path:
    """Where member ``seed`` of the ensemble run in ``root`` keeps its ``last.ckpt``."""
    return root / "members" / f"seed_{seed}" / "checkpoints" / "last.ckpt"


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
