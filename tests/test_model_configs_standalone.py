"""Every model config works on its own (``python train.py model=X``): no mandatory ``???`` that
only an experiment supplies."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from latentzoo.paths import config_dir
from tests.conftest import compose_config

MODELS = sorted(p.stem for p in (Path(config_dir()) / "model").glob("*.yaml"))


@pytest.mark.parametrize("model", MODELS)
def test_model_config_has_no_mandatory_values(model: str, tmp_path: Path) -> None:
    cfg = compose_config("train", [f"model={model}"], tmp_path)
    assert not OmegaConf.missing_keys(cfg.model), f"model={model} needs an experiment"


def test_soft_intro_vae_defaults_to_the_papers_beta_neg(tmp_path: Path) -> None:
    cfg = compose_config("train", ["model=soft_intro_vae", "data=proc_cifar"], tmp_path)
    assert cfg.model.beta_neg == 256.0  # README / paper: CIFAR-10, SVHN, (F)MNIST
