"""The train and eval tasks end to end on tiny CPU runs: fit, test, eval from the checkpoint's
own config, resume at the saved step, and the clear failures promised to users."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from latentzoo.eval import evaluate
from latentzoo.train import train
from latentzoo.utils import CheckpointError, NonFiniteLossError
from tests.conftest import TINY, TINY_DATA, compose_config, run_cli


def test_fast_dev_run(tmp_path: Path) -> None:
    cfg = compose_config("train", [*TINY_DATA, "debug=fdr"], tmp_path)
    metrics, objects = train(cfg)
    assert objects["trainer"].global_step == 1
    assert torch.isfinite(torch.tensor(metrics["test/loss"]))


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """A 4-step training run whose outputs several tests inspect."""
    out = tmp_path_factory.mktemp("run")
    metrics, objects = train(compose_config("train", TINY, out))
    assert objects["trainer"].global_step == 4
    assert {"train/loss", "val/loss", "test/loss", "test/recon", "test/kl"} <= set(metrics)
    return out


def test_run_dir_has_checkpoints_images_and_logs(trained_run: Path) -> None:
    assert (trained_run / "checkpoints" / "last.ckpt").is_file()
    assert list((trained_run / "checkpoints").glob("step_*.ckpt")), "no best checkpoint"
    assert list((trained_run / "images").glob("reconstructions_step*.png"))
    assert list((trained_run / "images").glob("traversals_step*.png"))
    assert list((trained_run / "csv").rglob("metrics.csv"))


def test_last_checkpoint_holds_the_final_step_between_validations(tmp_path: Path) -> None:
    overrides = [o for o in TINY if not o.startswith("trainer.max_steps")]
    cfg = compose_config("train", [*overrides, "trainer.max_steps=5", "test=false"], tmp_path)
    train(cfg)  # validation at steps 2 and 4 only
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert last["global_step"] == 5


def test_checkpoint_carries_resolved_config(trained_run: Path) -> None:
    checkpoint = torch.load(trained_run / "checkpoints" / "last.ckpt", weights_only=False)
    config = checkpoint["latentzoo"]["config"]
    assert config["model"]["_target_"] == "latentzoo.models.BetaVAE"
    assert config["model"]["encoder"]["out_features"] == 20  # interpolation resolved
    assert config["data"]["dataset"]["size"] == "small"


def test_eval_rebuilds_from_checkpoint(trained_run: Path, tmp_path: Path) -> None:
    ckpt = trained_run / "checkpoints" / "last.ckpt"
    cfg = compose_config(
        "eval",
        [
            f"ckpt_path={ckpt}",
            "trainer.enable_progress_bar=false",
            "callbacks=none",
            "extras.print_config=false",
        ],
        tmp_path,
    )
    metrics, objects = evaluate(cfg)
    report = json.loads((tmp_path / "metrics.json").read_text())
    assert report["global_step"] == 4
    assert report["metrics"]["test/loss"] == pytest.approx(metrics["test/loss"])
    # the datamodule came from the checkpoint: the small grid, not the default full one
    assert len(objects["datamodule"].dataset) < 737_280
    saved = torch.load(ckpt, weights_only=False)["state_dict"]
    for name, tensor in objects["model"].state_dict().items():
        assert torch.equal(tensor, saved[name]), name


def test_resume_continues_at_saved_step(trained_run: Path, tmp_path: Path) -> None:
    ckpt = trained_run / "checkpoints" / "last.ckpt"
    overrides = [o for o in TINY if not o.startswith("trainer.max_steps")]
    cfg = compose_config(
        "train", [*overrides, "trainer.max_steps=8", f"ckpt_path={ckpt}", "test=false"], tmp_path
    )
    _, objects = train(cfg)
    assert objects["trainer"].global_step == 8
    # Adam's step counter continued from 4: the optimizer state was restored, not re-created.
    resumed = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    adam_steps = {float(s["step"]) for s in resumed["optimizer_states"][0]["state"].values()}
    assert adam_steps == {8.0}
    # the resumed run logged only steps after the saved one
    csv = next((tmp_path / "csv").rglob("metrics.csv")).read_text().splitlines()
    header = csv[0].split(",")
    steps = {int(row.split(",")[header.index("step")]) for row in csv[1:]}
    assert min(steps) >= 4


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path: Path, monkeypatch) -> None:
    from latentzoo.models import BetaVAE

    real_step = BetaVAE.step

    def poisoned_step(self, batch, stage):
        terms = real_step(self, batch, stage)
        if stage == "train" and self.global_step == 3:
            terms["loss"] = terms["loss"] * float("nan")
        return terms

    monkeypatch.setattr(BetaVAE, "step", poisoned_step)
    cfg = compose_config(
        "train", [*TINY, "callbacks.model_checkpoint.every_n_train_steps=1"], tmp_path
    )
    with pytest.raises(NonFiniteLossError, match="global step 3"):
        train(cfg)
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert last["global_step"] == 3
    assert all(torch.isfinite(t).all() for t in last["state_dict"].values())


def test_eval_refuses_foreign_checkpoint(tmp_path: Path) -> None:
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {}, "global_step": 1}, foreign)
    cfg = compose_config("eval", [f"ckpt_path={foreign}"], tmp_path)
    with pytest.raises(CheckpointError, match="not written by latentzoo"):
        evaluate(cfg)


def test_cli_errors_are_clear(trained_run: Path, tmp_path: Path) -> None:
    unknown = run_cli("train.py", "model=no_such_model")
    assert unknown.returncode != 0
    assert "no_such_model" in unknown.stderr and "beta_vae" in unknown.stderr

    missing = run_cli(
        "eval.py", f"ckpt_path={tmp_path / 'missing.ckpt'}", f"paths.log_dir={tmp_path / 'logs'}"
    )
    assert missing.returncode == 2
    assert "does not exist" in missing.stderr

    # raised inside Hydra's instantiate, still reported as one line with exit status 2
    no_data = run_cli(
        "train.py",
        "data=dsprites",
        f"paths.data_dir={tmp_path / 'nodata'}",
        f"paths.log_dir={tmp_path / 'logs'}",
    )
    assert no_data.returncode == 2
    assert "dSprites not found" in no_data.stderr and "Traceback" not in no_data.stderr

    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint")
    unreadable = run_cli("eval.py", f"ckpt_path={garbage}", f"paths.log_dir={tmp_path / 'logs'}")
    assert unreadable.returncode == 2
    assert "could not be read" in unreadable.stderr

    # a checkpoint of another model type cannot be resumed as a beta_vae
    checkpoint = torch.load(trained_run / "checkpoints" / "last.ckpt", weights_only=False)
    checkpoint["latentzoo"]["config"]["model"]["_target_"] = "latentzoo.models.OtherModel"
    other = tmp_path / "other_model.ckpt"
    torch.save(checkpoint, other)
    mismatch = run_cli(
        "train.py", f"ckpt_path={other}", f"paths.log_dir={tmp_path / 'logs'}", *TINY
    )
    assert mismatch.returncode == 2
    assert "holds a latentzoo.models.OtherModel model" in mismatch.stderr

    blocker = tmp_path / "a_file"
    blocker.write_text("")
    unwritable = run_cli("train.py", f"paths.log_dir={blocker / 'logs'}")
    assert unwritable.returncode == 2
    assert "cannot be created" in unwritable.stderr


def test_eval_refuses_nonfinite_checkpoint(trained_run: Path, tmp_path: Path) -> None:
    checkpoint = torch.load(trained_run / "checkpoints" / "last.ckpt", weights_only=False)
    name = next(iter(checkpoint["state_dict"]))
    checkpoint["state_dict"][name].view(-1)[0] = float("nan")
    bad = tmp_path / "nan.ckpt"
    torch.save(checkpoint, bad)
    result = run_cli("eval.py", f"ckpt_path={bad}", f"paths.log_dir={tmp_path / 'logs'}")
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr
    assert str(bad) in errors[0] and "non-finite" in errors[0] and name in errors[0]


def test_console_scripts_match_root_scripts(tmp_path: Path) -> None:
    """``latentzoo-train`` / ``latentzoo-eval`` (installed by pip) work from any directory."""
    import shutil
    import subprocess

    train_script, eval_script = shutil.which("latentzoo-train"), shutil.which("latentzoo-eval")
    assert train_script and eval_script, "console scripts missing: pip install -e ."
    env = {k: v for k, v in os.environ.items() if k != "PROJECT_ROOT"}
    trained = subprocess.run(
        [train_script, *TINY, "test=false"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert trained.returncode == 0, trained.stderr[-3000:]
    (run,) = (tmp_path / "logs" / "train" / "runs").iterdir()  # logs below the working dir
    ckpt = run / "checkpoints" / "last.ckpt"
    evaluated = subprocess.run(
        [eval_script, f"ckpt_path={ckpt}"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    (eval_run,) = (tmp_path / "logs" / "eval" / "runs").iterdir()
    assert "test/loss" in json.loads((eval_run / "metrics.json").read_text())["metrics"]
