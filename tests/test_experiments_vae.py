"""The VAE-family experiment configs compose with the real dataset configs, and with the
procedural stand-in swapped in they train a few steps, validate, test and run the
disentanglement callback end to end."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest

from latentzoo.train import train
from tests.conftest import TINY, compose_config, run_cli

EXPERIMENTS = {
    # experiment: (real data config, offline stand-in, model class, settings from the spec / dlib)
    "lie_vae_dsprites": ("dsprites", "proc_dsprites", "LieVAE", {"hy_hes": 40.0}),
    "lie_vae_shapes3d": ("shapes3d", "proc_shapes3d", "LieVAE", {"hy_hes": 20.0}),
    "beta_vae_dsprites": ("dsprites", "proc_dsprites", "BetaVAE", {"beta": 4.0}),
    "beta_tcvae_dsprites": ("dsprites", "proc_dsprites", "BetaTCVAE", {"beta": 6.0}),
    "factor_vae_dsprites": ("dsprites", "proc_dsprites", "FactorVAE", {"gamma": 40.0}),
}
# the disentanglement callback, cut to one cheap metric
CHEAP_METRICS = ["+callbacks.disentanglement.metrics=[mig]"]


@pytest.mark.parametrize("experiment", sorted(EXPERIMENTS))
def test_experiment_composes_with_real_data(experiment: str) -> None:
    data, _, model, settings = EXPERIMENTS[experiment]
    cfg = compose_config("train", [f"experiment={experiment}"])
    dataset_class = {"dsprites": "DSprites", "shapes3d": "Shapes3D"}[data]
    assert cfg.data.dataset._target_ == f"latentzoo.data.datasets.{dataset_class}"
    assert cfg.model._target_ == f"latentzoo.models.{model}"
    assert "disentanglement" in cfg.callbacks
    for key, value in settings.items():
        assert cfg.model[key] == value
    lie = experiment.startswith("lie_vae")
    assert cfg.data.global_batch_size == (256 if lie else 64)  # the paper batch, any world size
    assert cfg.model.optimizer.lr == 1e-4
    # CLG-VAE has no validation or test split (lie_vae.md §6): all images, checkpoint by step
    no_validation = (cfg.data.val_size, cfg.data.test_size, cfg.trainer.limit_val_batches)
    assert (no_validation == (0, 0, 0)) == lie and cfg.test is not lie
    assert (cfg.callbacks.model_checkpoint.monitor is None) == lie
    assert cfg.trainer.max_steps == {
        "lie_vae_dsprites": 201_600,
        "lie_vae_shapes3d": 131_250,
    }.get(experiment, 300_000)


@pytest.mark.parametrize("experiment", sorted(EXPERIMENTS))
def test_experiment_trains_on_procedural_data(experiment: str, tmp_path: Path) -> None:
    _, stand_in, model, _ = EXPERIMENTS[experiment]
    cfg = compose_config(
        "train", [f"experiment={experiment}", f"data={stand_in}", *TINY, *CHEAP_METRICS], tmp_path
    )
    metrics, objects = train(cfg)
    assert type(objects["model"]).__name__ == model
    assert objects["trainer"].global_step == 4
    assert math.isfinite(metrics["train/loss"])
    lie = experiment.startswith("lie_vae")  # no test split in the paper's protocol
    assert ("test/loss" in metrics) is not lie
    assert lie or math.isfinite(metrics["test/loss"])
    # the disentanglement callback ran at the end of training and logged its score
    (log,) = (tmp_path / "csv").rglob("metrics.csv")
    rows = list(csv.DictReader(log.open()))
    key = "disentanglement/fast/mig/mig"  # the callback's fast preset, named as such
    mig = [float(r[key]) for r in rows if r.get(key)]
    assert mig and 0.0 <= mig[-1] <= 1.0
    if model == "BetaTCVAE":  # N of the TC estimator read from the training split
        assert objects["model"].dataset_size == len(objects["datamodule"].splits["train"])
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.slow
def test_lie_vae_experiment_from_the_command_line(tmp_path: Path) -> None:
    result = run_cli(
        "train.py",
        "experiment=lie_vae_dsprites",
        "data=proc_dsprites",
        *TINY,
        *CHEAP_METRICS,
        f"paths.output_dir={tmp_path}",
        f"hydra.run.dir={tmp_path}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
