"""import_lfm: an LFM checkpoint becomes a latentzoo checkpoint whose velocity (latentzoo time,
t = 0 noise) is −v_LFM(x, 1 − t); every key is checked; eval.py rebuilds it."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import hydra
import pytest
import torch

from latentzoo.import_lfm import import_lfm, read_lfm_checkpoint
from latentzoo.utils.checkpoint import checkpoint_config, load_checkpoint
from latentzoo.utils.errors import CheckpointError, LatentzooError
from tests.conftest import CLI_ENV, ROOT, compose_config
from tests.lfm_fixtures import load_fixture, reference_state_dict

PIXELS_16 = ["data=proc_blobs", "data.image_size=16", "model/autoencoder=identity"]
# the tiny reference nets of tests/fixtures/lfm, as latentzoo backbones
BACKBONES = {
    "dit_uncond": ["model/backbone=dit_tiny"],
    "dit_cond": ["model/backbone=dit_tiny", "model.num_classes=5", "model.label_dropout=0.1"],
    "edm_adm_cond": [
        "model/backbone=adm",
        "model.backbone.model_channels=64",
        "model.backbone.channel_mult=[1,2,2]",
        "model.backbone.num_res_blocks=1",
        "model.backbone.attention_resolutions=[8]",
        "model.num_classes=5",
    ],
    "guided_uncond": [
        "model/backbone=adm_guided",
        "model.backbone.model_channels=32",
        "model.backbone.channel_mult=[1,2,2]",
        "model.backbone.num_res_blocks=1",
        "model.backbone.attention_resolutions=[8]",
    ],
}


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_import(tmp_path: Path, name: str, *extra: str, prefix: str = "module.") -> Path:
    """Write the fixture's reference weights as LFM saves them, import them, return the ckpt."""
    lfm = tmp_path / f"{name}_model_475.pth"
    torch.save(reference_state_dict(load_fixture(name), prefix), lfm)
    out = tmp_path / f"{name}.ckpt"
    overrides = [f"lfm_ckpt={lfm}", f"out={out}", *PIXELS_16, *BACKBONES[name], *extra]
    import_lfm(compose_config("import_lfm", overrides, tmp_path / "run"))
    return out


def rebuild(path: Path):
    """The model as eval.py rebuilds it from the checkpoint."""
    checkpoint = load_checkpoint(path)
    model = hydra.utils.instantiate(checkpoint_config(checkpoint, path).model)
    model.on_load_checkpoint(checkpoint)
    model.load_state_dict(checkpoint["state_dict"])
    return model.eval()


@pytest.mark.parametrize("name", list(BACKBONES))
def test_imported_velocity_is_minus_lfm_velocity_at_one_minus_t(tmp_path: Path, name: str) -> None:
    fx = load_fixture(name)
    model = rebuild(run_import(tmp_path, name))
    assert model.time_convention == "lfm" and model.ema is None
    t_latentzoo = 1 - fx["t"]
    with torch.no_grad():
        v = model.velocity(fx["x"], t_latentzoo, fx.get("y"))
        assert torch.allclose(v, -fx["out"], atol=1e-5, rtol=0)
        if "out_null" in fx:  # the null label: LFM's zero one-hot (EDM) or null row (DiT)
            null = torch.full((3,), model.null_label)
            v_null = model.velocity(fx["x"], t_latentzoo, null)
            assert torch.allclose(v_null, -fx["out_null"], atol=1e-5, rtol=0)


def test_an_experiment_preset_gets_lfm_time_and_no_ema(tmp_path: Path) -> None:
    """latent_fm_proc_blobs sets an EMA (0.999): the import still records LFM's settings."""
    path = run_import(tmp_path, "dit_uncond", "experiment=latent_fm_proc_blobs")
    saved = checkpoint_config(load_checkpoint(path), path)
    assert saved.model.ema_decay is None and saved.model.time_convention == "lfm"
    assert saved.model.sampler.name == "euler"  # the rest of the preset is kept
    assert "hydra" not in saved and saved.lfm_ckpt.endswith("model_475.pth")


def test_lfm_adm_trained_without_label_dropout_refuses_guidance(tmp_path: Path) -> None:
    """LFM's ImageNet adm: null label exists (zero one-hot) but was never trained (§12.7)."""
    model = rebuild(run_import(tmp_path, "edm_adm_cond"))
    assert model.null_label == 5 and model.label_dropout == 0
    with pytest.raises(LatentzooError, match="never trained"):
        model.sample(2, cfg_scale=1.25, sampler="euler", steps=1)


def test_mismatched_weights_are_refused_in_one_line(tmp_path: Path) -> None:
    # adm_guided with attention at another latent resolution than LFM's net had
    with pytest.raises(CheckpointError) as error:
        run_import(tmp_path, "guided_uncond", "model.backbone.attention_resolutions=[4]")
    message = str(error.value)
    assert "\n" not in message and "ADMUNet" in message
    assert "unexpected (e.g. input_blocks.3.1.norm.weight" in message  # LFM's 8x8 attention
    # DiT weights offered to the adm backbone
    lfm = tmp_path / "dit.pth"
    torch.save(reference_state_dict(load_fixture("dit_uncond")), lfm)
    overrides = [f"lfm_ckpt={lfm}", f"out={tmp_path / 'x.ckpt'}", *PIXELS_16]
    overrides += BACKBONES["edm_adm_cond"][:-1]
    with pytest.raises(CheckpointError, match="do not match DhariwalUNet.*missing.*unexpected"):
        import_lfm(compose_config("import_lfm", overrides, tmp_path / "run"))
    assert not (tmp_path / "x.ckpt").exists()


def test_edm_resampling_filters_are_checked(tmp_path: Path) -> None:
    state = reference_state_dict(load_fixture("edm_adm_cond"))
    state["enc.8x8_down.conv0.resample_filter"] = torch.full((1, 1, 2, 2), 0.3)
    lfm = tmp_path / "edm.pth"
    torch.save(state, lfm)
    overrides = [f"lfm_ckpt={lfm}", f"out={tmp_path / 'x.ckpt'}", *PIXELS_16]
    with pytest.raises(CheckpointError, match="resampling filter"):
        import_lfm(compose_config("import_lfm", overrides + BACKBONES["edm_adm_cond"], tmp_path))


def test_dit_with_null_row_needs_the_label_dropout(tmp_path: Path) -> None:
    with pytest.raises(LatentzooError, match="model.label_dropout"):
        run_import(tmp_path, "dit_cond", "model.label_dropout=0")


def test_reads_bare_prefixed_and_content_checkpoints(tmp_path: Path) -> None:
    state = reference_state_dict(load_fixture("dit_uncond"))
    torch.save({f"module.{k}": v for k, v in state.items()}, tmp_path / "ddp.pth")
    assert read_lfm_checkpoint(tmp_path / "ddp.pth").keys() == state.keys()
    # LFM's content.pth pickles its argparse args: refused unless unsafe_load
    content = {"epoch": 3, "args": argparse.Namespace(lr=1e-4), "model_dict": state}
    torch.save(content, tmp_path / "content.pth")
    with pytest.raises(CheckpointError, match="unsafe_load=true"):
        read_lfm_checkpoint(tmp_path / "content.pth")
    assert read_lfm_checkpoint(tmp_path / "content.pth", unsafe_load=True).keys() == state.keys()
    torch.save({"epoch": 3}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="no state dict"):
        read_lfm_checkpoint(tmp_path / "other.pth")


@pytest.mark.slow
def test_cli_import_then_eval_py(tmp_path: Path) -> None:
    lfm = tmp_path / "model_475.pth"
    torch.save(reference_state_dict(load_fixture("dit_uncond"), "module."), lfm)
    out = tmp_path / "lfm.ckpt"
    env = {**CLI_ENV, "PYTHONPATH": str(ROOT / "src"), "PROJECT_ROOT": str(tmp_path)}
    args = [f"lfm_ckpt={lfm}", f"out={out}", *PIXELS_16, *BACKBONES["dit_uncond"]]
    args.append(f"hydra.run.dir={tmp_path / 'import_run'}")
    done = subprocess.run(
        [sys.executable, "-m", "latentzoo.import_lfm", *args],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert out.is_file()
    done = subprocess.run(
        [sys.executable, str(ROOT / "eval.py"), f"ckpt_path={out}", "trainer.accelerator=cpu",
         "trainer.limit_test_batches=1", "extras.print_config=false",
         f"paths.output_dir={tmp_path / 'eval'}", f"hydra.run.dir={tmp_path / 'eval'}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "eval" / "metrics.json").is_file()
