"""Every config group exists, every model x data x trainer combination composes, and the
models and datamodules it names instantiate."""

from __future__ import annotations

from pathlib import Path

import hydra
import pytest
from omegaconf import DictConfig

from latentzoo.paths import config_dir
from tests.conftest import TINY, compose_config

CONFIGS = Path(config_dir())
GROUPS = [
    "model",
    "data",
    "trainer",
    "callbacks",
    "logger",
    "paths",
    "extras",
    "hydra",
    "debug",
    "experiment",
    "hparams_search",
    "local",
]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


def test_every_group_exists() -> None:
    for group in GROUPS:
        assert (CONFIGS / group).is_dir(), f"configs/{group}/ is missing"
    for group in set(GROUPS) - {"local"}:
        assert options(group), f"configs/{group}/ has no options"


@pytest.mark.parametrize("model", options("model"))
@pytest.mark.parametrize("data", options("data"))
@pytest.mark.parametrize("trainer", options("trainer"))
def test_model_data_trainer_compose(model: str, data: str, trainer: str, tmp_path) -> None:
    cfg = compose_config(
        "train", [f"model={model}", f"data={data}", f"trainer={trainer}"], tmp_path
    )
    assert isinstance(cfg.trainer, DictConfig) and cfg.trainer._target_.endswith("Trainer")
    assert cfg.model._target_.startswith("latentzoo.models.")
    assert list(cfg.data.image_shape) == list(cfg.model.encoder.image_shape)


@pytest.mark.parametrize("model", options("model"))
@pytest.mark.parametrize("data", [d for d in options("data") if d.startswith("proc_")])
def test_model_and_datamodule_instantiate(model: str, data: str, tmp_path) -> None:
    cfg = compose_config(
        "train",
        [
            f"model={model}",
            f"data={data}",
            "data.dataset.size=small",
            "data.val_size=8",
            "data.test_size=8",
        ],
        tmp_path,
    )
    datamodule = hydra.utils.instantiate(cfg.data)
    model_ = hydra.utils.instantiate(cfg.model)
    images, factors = next(iter(datamodule.train_dataloader()))
    assert tuple(images.shape[1:]) == tuple(cfg.data.image_shape)
    assert factors.shape == (images.shape[0], len(datamodule.factor_sizes))
    assert model_.encode(images).shape == (images.shape[0], cfg.model.latent_dim)


@pytest.mark.parametrize("trainer", ["default", "cpu", "ddp_sim", "eval"])
def test_cpu_trainers_instantiate(trainer: str, tmp_path) -> None:
    cfg = compose_config("train", [f"trainer={trainer}"], tmp_path)
    built = hydra.utils.instantiate(cfg.trainer, logger=False, enable_checkpointing=False)
    expected_devices = 2 if trainer == "ddp_sim" else 1
    assert built.num_devices == expected_devices


@pytest.mark.parametrize("name", options("callbacks") + ["none"])
def test_callbacks_instantiate(name: str, tmp_path) -> None:
    cfg = compose_config("train", [f"callbacks={name}"], tmp_path)
    for conf in (cfg.callbacks or {}).values():
        assert hydra.utils.instantiate(conf) is not None


@pytest.mark.parametrize("name", ["csv", "tensorboard", "many_loggers"])
def test_loggers_instantiate(name: str, tmp_path) -> None:
    cfg = compose_config("train", [f"logger={name}"], tmp_path)
    loggers = [hydra.utils.instantiate(conf) for conf in cfg.logger.values()]
    assert loggers and all(hasattr(logger, "log_metrics") for logger in loggers)


@pytest.mark.parametrize("debug", options("debug"))
def test_debug_configs_compose(debug: str, tmp_path) -> None:
    cfg = compose_config("train", [f"debug={debug}"], tmp_path)
    assert cfg.task_name == "debug"
    assert cfg.trainer.accelerator == "cpu"


@pytest.mark.parametrize("experiment", options("experiment"))
def test_experiments_compose(experiment: str, tmp_path) -> None:
    cfg = compose_config("train", [f"experiment={experiment}"], tmp_path)
    hydra.utils.instantiate(cfg.model)


@pytest.mark.parametrize("search", options("hparams_search"))
def test_hparams_searches_compose(search: str, tmp_path) -> None:
    cfg = compose_config("train", [f"hparams_search={search}"], tmp_path)
    assert cfg.optimized_metric
    assert cfg.hydra.sweeper.params


def test_launchers_compose(tmp_path) -> None:
    slurm = compose_config("train", ["hydra/launcher=slurm"], tmp_path)
    assert "SlurmLauncher" in slurm.hydra.launcher._target_
    joblib = compose_config("train", ["hydra/launcher=joblib"], tmp_path)
    assert "JoblibLauncher" in joblib.hydra.launcher._target_


def test_eval_config_composes(tmp_path) -> None:
    cfg = compose_config("eval", ["ckpt_path=some.ckpt"], tmp_path)
    assert cfg.task_name == "eval"
    assert cfg.get("model") is None and cfg.get("data") is None  # taken from the checkpoint


def test_data_dir_follows_environment(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("LATENTZOO_DATA_DIR", str(tmp_path / "datasets"))
    cfg = compose_config("train", [], tmp_path)
    assert cfg.paths.data_dir == str(tmp_path / "datasets")


def test_tiny_overrides_compose(tmp_path) -> None:
    cfg = compose_config("train", TINY, tmp_path)
    assert cfg.trainer.max_steps == 4
