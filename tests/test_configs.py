"""Every config group exists, every model x data x trainer combination composes, and the
models and datamodules it names instantiate."""

from __future__ import annotations

from pathlib import Path

import hydra
import pytest
import torch
from omegaconf import DictConfig, OmegaConf

from latentzoo.paths import config_dir
from latentzoo.utils.distributed import instantiate_datamodule
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


def data_kind(data: str) -> str:
    """What a data config yields: factor images, sequences, cached latents or plain images."""
    target = (CONFIGS / "data" / f"{data}.yaml").read_text().split("_target_:")[1].split()[0]
    name = target.rsplit(".", 1)[-1]
    return {
        "GroundTruthDataModule": "factors",
        "SequenceDataModule": "sequences",
        "LatentsDataModule": "latents",
    }.get(name, "images")


# The data each model trains on (by kind), and the offline data + overrides of a quick build.
MODEL_DATA = {
    "beta_vae": ("factors", "images"),
    "beta_tcvae": ("factors", "images"),
    "factor_vae": ("factors", "images"),
    "lie_vae": ("factors", "images"),
    "kl_autoencoder": ("factors", "images"),
    "latent_fm": ("images", "latents"),
    "latent_flow": ("sequences",),
    "dlp": ("images",),
    "nfpi": ("images",),
    "soft_intro_vae": ("images",),
}
SMALL_FACTORS = ["data.dataset.size=small", "data.val_size=8", "data.test_size=8"]
OFFLINE_BUILDS = {
    "beta_vae": [("proc_dsprites", SMALL_FACTORS), ("proc_shapes3d", SMALL_FACTORS)],
    "beta_tcvae": [("proc_dsprites", [*SMALL_FACTORS, "model.dataset_size=4096"])],
    "factor_vae": [("proc_dsprites", SMALL_FACTORS)],
    "lie_vae": [("proc_dsprites", SMALL_FACTORS), ("proc_shapes3d", SMALL_FACTORS)],
    "kl_autoencoder": [
        ("proc_blobs", ["data.image_size=32", "data.num_train=16", "data.batch_size=8"])
    ],
    "latent_fm": [
        (
            "proc_blobs",
            [
                "data.image_size=32",
                "data.num_train=16",
                "data.batch_size=8",
                "model/backbone=dit_tiny",
                "model/autoencoder=identity",
            ],
        )
    ],
    "latent_flow": [("proc_dsprites_seq", []), ("proc_digits_seq", [])],
    "dlp": [
        (
            "proc_multishapes",
            [
                "data.num_train=16",
                "data.batch_size=4",
                "model.n_kp=4",
                "model.n_kp_prior=6",
                "model.enc_channels=[8,16,16]",
            ],
        )
    ],
    "nfpi": [
        (
            "proc_blobs",
            [
                "data.image_size=32",
                "data.num_classes=3",
                "data.num_train=16",
                "data.batch_size=8",
                "model.flow.steps=[1,1,1]",
                "model.flow.blocks=[1,1,1]",
                "model.flow.hidden=8",
            ],
        )
    ],
    "soft_intro_vae": [
        (
            "proc_cifar",
            [
                "data.num_train=16",
                "data.num_test=16",
                "data.val_size=8",
                "data.batch_size=8",
                "model.beta_neg=256",
                "model.channels=[8,16,32]",
                "model.latent_dim=8",
            ],
        )
    ],
}


def test_every_model_is_covered() -> None:
    assert set(MODEL_DATA) == set(options("model")) == set(OFFLINE_BUILDS)


@pytest.mark.parametrize(
    "model,data",
    [(m, d) for m in options("model") for d in options("data") if data_kind(d) in MODEL_DATA[m]],
)
def test_model_data_compose(model: str, data: str, tmp_path) -> None:
    cfg = compose_config("train", [f"model={model}", f"data={data}"], tmp_path)
    assert cfg.model._target_.startswith("latentzoo.models.")
    resolved = OmegaConf.to_container(cfg.model, resolve=True)  # shapes come from the data
    assert "${" not in str(resolved)


@pytest.mark.parametrize("trainer", options("trainer"))
def test_trainers_compose(trainer: str, tmp_path) -> None:
    cfg = compose_config("train", [f"trainer={trainer}"], tmp_path)
    assert isinstance(cfg.trainer, DictConfig) and cfg.trainer._target_.endswith("Trainer")


@pytest.mark.parametrize(
    "model,data,overrides",
    [(m, d, o) for m, builds in OFFLINE_BUILDS.items() for d, o in builds],
)
def test_model_trains_on_offline_data(model: str, data: str, overrides: list, tmp_path) -> None:
    """The model and datamodule a config names build, and one batch gives a finite loss."""
    torch.manual_seed(0)
    cfg = compose_config("train", [f"model={model}", f"data={data}", *overrides], tmp_path)
    datamodule = instantiate_datamodule(cfg.data)
    model_ = hydra.utils.instantiate(cfg.model)
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    images = batch["frames"][:, 0] if isinstance(batch, dict) else batch[0]
    assert tuple(images.shape[1:]) == tuple(cfg.data.image_shape)
    terms = model_.step(batch, "train")
    assert torch.isfinite(terms["loss"])
    if data_kind(data) == "factors":
        assert model_.encode(batch[0]).shape == (images.shape[0], cfg.model.latent_dim)


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
    autoencoder = str(cfg.model.get("autoencoder", {}).get("_target_", ""))
    if "Diffusers" in autoencoder:  # needs the diffusers extra and downloaded weights
        assert OmegaConf.to_container(cfg.model, resolve=True)
        return
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


# The paper's latent_fm runs (latent_fm.md §6): backbone, global batch, epochs, lr, cosine
# schedule, DiT parameters (M, on 4x32x32 latents, §4) where the backbone is a DiT.
LATENT_FM_PAPER = {
    "latent_fm_celeba256_dit": ("dit_l2", 32, 500, 2e-4, False, 456.8),
    "latent_fm_celeba256_adm": ("adm_guided_celeba", 112, 500, 2e-5, True, None),
    "latent_fm_ffhq256_adm": ("adm", 128, 500, 2e-5, True, None),
    "latent_fm_church256_dit": ("dit_l2", 96, 600, 1e-4, False, 456.8),
    "latent_fm_bedroom256_adm": ("adm", 128, 500, 1e-5, False, None),
    "latent_fm_imagenet256_ditb2": ("dit_b2", 1280, 1000, 1e-4, False, 130.3),
}


def test_every_latent_fm_experiment_has_an_lfm_preset() -> None:
    papers = {e for e in options("experiment") if e.startswith("latent_fm_") and "256" in e}
    assert papers == set(LATENT_FM_PAPER) | {f"{e}_lfm" for e in LATENT_FM_PAPER}


@pytest.mark.parametrize("preset", ["", "_lfm"])
@pytest.mark.parametrize("experiment", sorted(LATENT_FM_PAPER))
def test_latent_fm_paper_experiment_recipe(experiment: str, preset: str, tmp_path) -> None:
    backbone, batch, epochs, lr, cosine, params = LATENT_FM_PAPER[experiment]
    if not (CONFIGS / "model" / "backbone" / f"{backbone}.yaml").is_file():
        pytest.skip(f"model/backbone={backbone} comes from the ADM backbone branch")
    cfg = compose_config("train", [f"experiment={experiment}{preset}"], tmp_path)
    # trained from the latent cache that the header's command writes
    assert cfg.data._target_.endswith("LatentsDataModule")
    header = (CONFIGS / "experiment" / f"{experiment}.yaml").read_text()
    cache = Path(cfg.data.path).name
    assert cache.endswith("_sd_vae") and f"latents/{cache}'" in header
    assert (
        "python -m latentzoo.cache_latents data=" in header and "model/autoencoder=sd_vae" in header
    )
    assert cfg.model.autoencoder.scale_factor == 0.18215 and cfg.model.posterior == "sample"
    assert cfg.data.global_batch_size == batch and list(cfg.data.image_shape) == [3, 256, 256]
    assert cfg.trainer.max_epochs == epochs and cfg.trainer.max_steps == -1
    assert cfg.trainer.precision == "32-true" and cfg.float32_matmul_precision == "high"
    assert cfg.model.sampler.name == "dopri5"
    # EMA 0.9999 by default; LFM's presets sample the raw weights
    assert cfg.model.ema_decay == (None if preset else 0.9999)
    if "imagenet" in experiment:
        assert cfg.data.num_classes == 1000 and cfg.model.label_dropout == 0.1
        assert cfg.model.cfg_scale == 1.5 and cfg.model.backbone.grad_checkpointing
    # lr schedule: constant, or LFM's per-epoch cosine to 1e-5 over the epochs
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.model.optimizer.lr)
    sched = hydra.utils.instantiate(cfg.model.scheduler)(optimizer=opt)
    lrs = [sched.get_last_lr()[0]]
    for _ in range(epochs):
        opt.step()
        sched.step()
        lrs.append(sched.get_last_lr()[0])
    assert lrs[0] == pytest.approx(lr)
    if cosine:
        assert cfg.model.scheduler_interval == "epoch"
        assert lrs[-1] == pytest.approx(1e-5) and lrs[epochs // 2] == pytest.approx((lr + 1e-5) / 2)
    else:
        assert lrs[-1] == pytest.approx(lr)
    if params is not None:
        has_null = cfg.model.label_dropout > 0
        with torch.device("meta"):
            net = hydra.utils.instantiate(cfg.model.backbone)(
                in_channels=4,
                input_size=32,
                num_classes=cfg.data.num_classes,
                class_dropout=1.0 if has_null else 0.0,
            )
        assert sum(p.numel() for p in net.parameters()) / 1e6 == pytest.approx(params, abs=0.1)
