"""An ensemble under ``trainer=ddp_sim`` (2 CPU processes over gloo, the code path of
``trainer=ddp``) through the CLI: its members are split over the ranks, each member is still the
one-device single run ``train.py seed=s``, and a ``kill -9`` of the whole job resumes exactly."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from tests.conftest import run_cli
from tests.ensemble.helpers import TINY_RUN, max_diff, model_overrides, run, weights
from tests.resume_harness import Kill, kill_and_resume, run_to_end

pytestmark = pytest.mark.slow

ATOL = 1e-4  # as tests/ensemble/test_ensemble_runs.py: vmap over 1, 2 or 3 members sums apart
SEEDS = [0, 1, 2]  # 3 members on 2 ranks: rank 0 trains seeds 0 and 1, rank 1 seed 2
DDP = ["trainer=ddp_sim", "ensemble.seeds=range(3)"]  # as the shell hands it to train.py


def member_dir(root, seed):
    return root / "members" / f"seed_{seed}"


def member_state(root, seed) -> dict:
    ckpt = member_dir(root, seed) / "checkpoints" / "last.ckpt"
    return torch.load(ckpt, map_location="cpu", weights_only=False)


@pytest.mark.parametrize("model", ["beta_vae", "beta_tcvae", "factor_vae", "lie_vae"])
def test_members_split_over_ranks_are_the_single_runs(tmp_path, model):
    overrides = [*TINY_RUN, *model_overrides(model), *DDP]
    result = run_cli("train.py", *overrides, f"hydra.run.dir={tmp_path / 'ddp'}")
    assert result.returncode == 0, result.stderr[-3000:]
    ddp = tmp_path / "ddp"
    one_process = run(tmp_path / "one", [*model_overrides(model), f"ensemble.seeds={SEEDS}"])
    for seed in SEEDS:
        ours = weights(member_dir(ddp, seed) / "checkpoints" / "last.ckpt")
        reference = weights(member_dir(one_process, seed) / "checkpoints" / "last.ckpt")
        assert max_diff(ours, reference) < ATOL
        record = json.loads((member_dir(ddp, seed) / "metrics.json").read_text())
        assert record["status"] == "completed" and record["global_step"] == 3
        assert record["ensemble"] == {"seeds": SEEDS, "index": SEEDS.index(seed)}
        # every rank writes its own members' logs (Lightning's loggers write on rank 0 only)
        assert "train/loss" in (member_dir(ddp, seed) / "csv/version_0/metrics.csv").read_text()
    first, last = (weights(member_dir(ddp, s) / "checkpoints" / "last.ckpt") for s in (0, 2))
    assert max_diff(first, last) > 100 * ATOL  # the seeds are told apart
    ensemble_record = json.loads((ddp / "metrics.json").read_text())
    assert ensemble_record["metrics"]["ensemble/members_alive"] == len(SEEDS)

    # the member's own overrides re-run its single run: one device, not the ensemble's two
    saved = yaml.safe_load((member_dir(ddp, 2) / ".hydra" / "overrides.yaml").read_text())
    assert "trainer.devices=1" in saved and "seed=2" in saved
    assert not any(item.startswith("ensemble") for item in saved)
    single = run_cli("train.py", *saved, f"hydra.run.dir={tmp_path / 'single'}")
    assert single.returncode == 0, single.stderr[-3000:]
    reference = weights(tmp_path / "single" / "checkpoints" / "last.ckpt")
    assert max_diff(weights(member_dir(ddp, 2) / "checkpoints" / "last.ckpt"), reference) < ATOL


def test_kill_9_and_resume_under_ddp_is_exact(tmp_path):
    overrides = [
        *TINY_RUN,
        *model_overrides("beta_vae"),
        *DDP,
        "trainer.max_steps=60",
        "trainer.limit_train_batches=16",  # crosses epoch ends
        "callbacks.model_checkpoint.every_n_train_steps=5",
    ]
    run_to_end(tmp_path / "uninterrupted", overrides)
    result = kill_and_resume(
        tmp_path / "killed", overrides, [Kill(after_saves=1)], last_name="ensemble_last.ckpt"
    )
    killed = result.attempts[0]
    assert killed.killed and killed.saved_step is not None and killed.saved_step < 60
    for seed in SEEDS:
        resumed = member_state(tmp_path / "killed", seed)
        reference = member_state(tmp_path / "uninterrupted", seed)
        assert resumed["global_step"] == reference["global_step"] == 60
        for key in ("state_dict", "optimizer_states"):
            assert _equal(resumed[key], reference[key]), f"seed {seed}: {key} differs"


def _equal(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b, strict=True))
    if torch.is_tensor(a):
        return torch.equal(a, b)
    return a == b
