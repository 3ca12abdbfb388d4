"""A single run resumed from a member's ``last.ckpt`` continues as the single run would.

``train.py seed=s ckpt_path=<ens>/members/seed_s/checkpoints/last.ckpt trainer.max_steps=6``
after a 3-step ensemble must reach the weights, step and epoch of ``train.py seed=s
trainer.max_steps=6`` from scratch (tolerance as in ``test_ensemble_runs``: the vmapped members
differ from their single runs by < 2e-5; the loop path, LieVAE, is bit-exact). That holds only
if the member's checkpoint carries the single run's loop progress (step count, epoch), its
loader position and its noise stream: each one wrong makes these tests fail.
"""

from __future__ import annotations

import pytest
import torch

from tests.ensemble.helpers import STEPS, load, max_diff, member_ckpt, model_overrides, run

ATOL = 1e-4
SEED = 1  # the second member: its index and its seed are both told apart from member 0's


@pytest.mark.slow
@pytest.mark.parametrize("model", ["beta_vae", "beta_tcvae", "factor_vae", "lie_vae"])
def test_a_single_run_resumed_from_a_member_continues_as_the_single_run(tmp_path, model):
    overrides = model_overrides(model)
    ens = run(tmp_path / "ens", [*overrides, "ensemble.seeds=[0,1]"])
    total = [*overrides, f"seed={SEED}", f"trainer.max_steps={2 * STEPS}"]
    straight = load(run(tmp_path / "straight", total) / "checkpoints" / "last.ckpt")
    resumed_dir = run(tmp_path / "resumed", [*total, f"ckpt_path={member_ckpt(ens, SEED)}"])
    resumed = load(resumed_dir / "checkpoints" / "last.ckpt")

    assert (resumed["global_step"], resumed["epoch"]) == (2 * STEPS, straight["epoch"])
    straight_loader = straight["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert resumed["loops"]["fit_loop"]["state_dict"]["combined_loader"] == straight_loader
    diff = max_diff(resumed["state_dict"], straight["state_dict"])
    assert diff == 0.0 if model == "lie_vae" else diff < ATOL
    half = load(member_ckpt(ens, SEED))["state_dict"]
    assert max_diff(resumed["state_dict"], half) > ATOL  # the resumed half did train


@pytest.mark.slow
@pytest.mark.parametrize("model", ["beta_vae", "factor_vae"])  # automatic / manual optimisation
def test_a_member_checkpoint_holds_the_single_runs_training_state(tmp_path, model):
    """The member's loops, step, epoch and noise stream equal those of the single run's
    ``last.ckpt`` saved by the step cadence after the same steps."""
    overrides = model_overrides(model)
    ens = load(member_ckpt(run(tmp_path / "ens", [*overrides, "ensemble.seeds=[0,1]"]), SEED))
    cadence = f"callbacks.model_checkpoint.every_n_train_steps={STEPS}"
    single_dir = run(tmp_path / "single", [*overrides, f"seed={SEED}", cadence])
    single = load(single_dir / "checkpoints" / "last.ckpt")
    assert ens["loops"] == single["loops"]
    assert (ens["global_step"], ens["epoch"]) == (single["global_step"], single["epoch"])
    ours = ens["callbacks"]["TrainingRandomness"]
    theirs = single["callbacks"]["TrainingRandomness"]
    assert (ours["seed"], ours["world_size"]) == (theirs["seed"], theirs["world_size"])
    assert torch.equal(ours["rng"][0]["torch"], theirs["rng"][0]["torch"])


@pytest.mark.slow
def test_a_member_resumed_across_an_epoch_end(tmp_path):
    """3 batches per epoch: the member saved on an epoch's last batch resumes into the next."""
    overrides = [*model_overrides("beta_vae"), f"trainer.limit_train_batches={STEPS}"]
    ens = run(tmp_path / "ens", [*overrides, "ensemble.seeds=[0,1]"])
    total = [*overrides, f"seed={SEED}", f"trainer.max_steps={2 * STEPS + 1}"]
    straight = load(run(tmp_path / "straight", total) / "checkpoints" / "last.ckpt")
    resumed_dir = run(tmp_path / "resumed", [*total, f"ckpt_path={member_ckpt(ens, SEED)}"])
    resumed = load(resumed_dir / "checkpoints" / "last.ckpt")
    assert (resumed["global_step"], resumed["epoch"]) == (
        straight["global_step"],
        straight["epoch"],
    )
    assert max_diff(resumed["state_dict"], straight["state_dict"]) < ATOL
