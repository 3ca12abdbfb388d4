"""The disentanglement suite where users meet it: eval.py's metrics=disentanglement and the
training callback, plus the refusals for models without encode and data without factors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from latentzoo.eval import evaluate
from latentzoo.metrics.ground_truth import DisentanglementCallback, DisentanglementMetrics
from latentzoo.train import train
from latentzoo.utils import LatentzooError, MissingCapabilityError
from latentzoo.utils.distributed import instantiate_datamodule
from tests.conftest import TINY, compose_config

SMALL = {
    "mig": {"num_train": 500},
    "sap": {"num_train": 500, "num_test": 250},
    "beta_vae": {"num_train": 200, "num_eval": 100, "batch_size": 16},
}


def test_eval_reports_disentanglement_of_checkpoint(tmp_path: Path) -> None:
    train_dir, eval_dir = tmp_path / "train", tmp_path / "eval"
    train(compose_config("train", [*TINY, "test=false"], train_dir))
    cfg = compose_config(
        "eval",
        [
            f"ckpt_path={train_dir / 'checkpoints' / 'last.ckpt'}",
            "metrics=disentanglement",
            "metrics.disentanglement.preset=fast",
            "metrics.disentanglement.metrics=[mig,sap]",
            "test_loop=false",
            "callbacks=none",
        ],
        eval_dir,
    )
    metrics, _ = evaluate(cfg)
    record = json.loads((eval_dir / "metrics.json").read_text())
    report = record["metrics"]
    assert set(report) == {"disentanglement/fast/mig/mig", "disentanglement/fast/sap/sap"}
    protocol = record["protocols"]["disentanglement"]  # what the numbers depend on
    assert protocol["preset"] == "fast" and protocol["seed"] == 0
    assert protocol["settings"]["mig"]["num_train"] == 2000
    assert protocol["settings"]["sap"] == {
        "num_train": 2000,
        "num_test": 1000,
        "continuous_factors": False,
    }
    assert report == pytest.approx(metrics)
    assert all(0.0 <= value <= 1.0 for value in report.values())


class _Factors:
    """A datamodule-like object whose dataset's images are its factors as pixels."""

    class dataset:  # noqa: N801 - mimics the attribute of a datamodule
        factor_sizes = (4, 5)

        @staticmethod
        def sample_factors(n, rng):
            return torch.stack(
                [torch.as_tensor(rng.integers(0, s, n)) for s in (4, 5)], dim=1
            ).numpy()

        @staticmethod
        def images_of(factors):
            return torch.as_tensor(factors, dtype=torch.float32).view(-1, 2, 1, 1)


class _IdentityEncoder(torch.nn.Module):
    def __init__(self, noise: bool = False) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))
        self.noise = noise

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        codes = x.flatten(1) * self.scale
        return torch.randn_like(codes) if self.noise else codes


def test_metric_set_separates_good_from_random_codes() -> None:
    metric = DisentanglementMetrics(metrics=["mig", "sap", "beta_vae"], overrides=SMALL)
    good = metric(_IdentityEncoder(), _Factors())
    bad = metric(_IdentityEncoder(noise=True), _Factors())
    assert good["mig/mig"] > 0.9 and bad["mig/mig"] < 0.1
    assert good["beta_vae/eval_accuracy"] > 0.95 > bad["beta_vae/eval_accuracy"]


def test_refuses_model_without_encode_and_data_without_factors() -> None:
    metric = DisentanglementMetrics(metrics=["mig"], overrides=SMALL)
    with pytest.raises(MissingCapabilityError, match="encode"):
        metric(torch.nn.Linear(2, 2), _Factors())
    with pytest.raises(LatentzooError, match="ground-truth factors"):
        metric(_IdentityEncoder(), object())


def test_callback_logs_fast_preset(tmp_path: Path) -> None:
    cfg = compose_config("train", [*TINY, "test=false"], tmp_path)
    callback = DisentanglementCallback(every_n_steps=2, metrics=["mig"], overrides=SMALL)
    import hydra

    model = hydra.utils.instantiate(cfg.model)
    datamodule = instantiate_datamodule(cfg.data)
    trainer = hydra.utils.instantiate(
        cfg.trainer, callbacks=[callback], logger=hydra.utils.instantiate(cfg.logger.csv)
    )
    trainer.fit(model, datamodule=datamodule)
    rows = next((tmp_path / "csv").rglob("metrics.csv")).read_text()
    assert "disentanglement/fast/mig/mig" in rows.splitlines()[0]
