"""A single run resumed from a member's ``last.ckpt`` continues as the single run would.

``train.py seed=s ckpt_path=<ens>/members/seed_s/checkpoints/last.ckpt trainer.max_steps=6``
after a 3-step ensemble must reach the weights, step and epoch of ``train.py seed=s
trainer.max_steps=6`` from scratch (tolerance as in ``test_ensemble_runs``: the vmapped members
differ from their single runs by < 2e-5; the loop path, LieVAE, is bit-exact). That holds only
if the member's checkpoint carries the single run's loop progress (step count, epoch), its
loader position and its noise stream: each one wrong makes these tests fail.
"""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from latentzoo.ensemble import run as ensemble_run
from latentzoo.ensemble.run import _images
from latentzoo.train import train
from tests.conftest import compose_config
from tests.ensemble.helpers import (
    STEPS,
    TINY_RUN,
    load,
    max_diff,
    member_ckpt,
    model_overrides,
    run,
)

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
    # plain values only, as a single run's checkpoint IO writes: weights_only loads it as it is
    assert torch.serialization.get_unsafe_globals_in_checkpoint(member_ckpt(ens, SEED)) == []
    half = load(member_ckpt(ens, SEED))["state_dict"]
    assert max_diff(resumed["state_dict"], half) > ATOL  # the resumed half did train


@pytest.mark.slow
@pytest.mark.parametrize("model", ["beta_vae", "factor_vae"])  # automatic / manual optimisation
def test_a_member_checkpoint_holds_the_single_runs_training_state(tmp_path, model):
    """The member's loops, step, epoch and noise stream equal those of the single run's
    ``last.ckpt`` saved by the step cadence after the same steps."""
    overrides = model_overrides(model)
    ens_dir = run(tmp_path / "ens", [*overrides, "ensemble.seeds=[0,1]"])
    ens = load(member_ckpt(ens_dir, SEED))
    cadence = f"callbacks.model_checkpoint.every_n_train_steps={STEPS}"
    single_dir = run(tmp_path / "single", [*overrides, f"seed={SEED}", cadence])
    single = load(single_dir / "checkpoints" / "last.ckpt")
    assert ens["loops"] == single["loops"]
    assert (ens["global_step"], ens["epoch"]) == (single["global_step"], single["epoch"])
    ours = ens["callbacks"]["TrainingRandomness"]
    theirs = single["callbacks"]["TrainingRandomness"]
    assert (ours["seed"], ours["world_size"]) == (theirs["seed"], theirs["world_size"])
    assert torch.equal(ours["rng"][0]["torch"], theirs["rng"][0]["torch"])
    assert ens["callbacks"].keys() == single["callbacks"].keys()  # the same checkpoint callback
    saver = next(key for key in single["callbacks"] if key.startswith("Checkpoints"))
    assert ens["callbacks"][saver]["last_model_path"] == str(member_ckpt(ens_dir, SEED))


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


@pytest.mark.slow
@pytest.mark.parametrize("model", ["beta_vae", "factor_vae"])
def test_a_dropped_members_checkpoint_is_its_single_run_at_the_failing_step(
    tmp_path, monkeypatch, model
):
    """Member ``SEED`` meets a NaN batch at step 1 and is dropped: its ``last.ckpt`` is its
    single run's state before that step (weights, optimizer, step, loader position and noise
    stream), the state a failed single run resumes from. Resumed without the bad batch, it
    reaches the straight single run's weights."""
    bad_step = 1
    calls = iter(range(10**6))

    def poisoned(batches, device):
        images = _images(batches, device)
        if next(calls) == bad_step:
            images[1] = float("nan")  # member 1 is seed SEED
        return images

    monkeypatch.setattr(ensemble_run, "_images", poisoned)
    overrides = model_overrides(model)
    ens = run(tmp_path / "ens", [*overrides, "ensemble.seeds=[0,1]"])
    monkeypatch.undo()
    dropped = load(member_ckpt(ens, SEED))
    assert dropped["global_step"] == bad_step
    record = json.loads((member_ckpt(ens, SEED).parents[1] / "metrics.json").read_text())
    assert record["status"] == "failed" and record["global_step"] == bad_step

    total = [*overrides, f"seed={SEED}", f"trainer.max_steps={2 * STEPS}"]
    straight = load(run(tmp_path / "straight", total) / "checkpoints" / "last.ckpt")
    resumed_dir = run(tmp_path / "resumed", [*total, f"ckpt_path={member_ckpt(ens, SEED)}"])
    resumed = load(resumed_dir / "checkpoints" / "last.ckpt")
    assert resumed["global_step"] == straight["global_step"] == 2 * STEPS
    assert max_diff(resumed["state_dict"], straight["state_dict"]) < ATOL


@pytest.mark.slow
def test_resume_auto_continues_an_interrupted_member_as_its_single_run(tmp_path, monkeypatch):
    """The ensemble is stopped (Ctrl-C) after step 3 of 6; ``train.py <the member's
    overrides.yaml> resume=auto`` in the member's dir finds its ``last.ckpt`` and finishes it
    as the single run, which then equals the straight single run."""
    calls = iter(range(10**6))

    def interrupted(batches, device):
        if next(calls) == STEPS:
            raise KeyboardInterrupt
        return _images(batches, device)

    monkeypatch.setattr(ensemble_run, "_images", interrupted)
    common = [*model_overrides("beta_vae"), f"trainer.max_steps={2 * STEPS}"]
    cadence = f"callbacks.model_checkpoint.every_n_train_steps={STEPS}"
    ens_overrides = [*common, cadence, "ensemble.seeds=[0,1]"]
    hydra_dir = tmp_path / "ens" / ".hydra"  # what the CLI writes before the task runs
    hydra_dir.mkdir(parents=True)
    (hydra_dir / "overrides.yaml").write_text(yaml.safe_dump([*TINY_RUN, *ens_overrides]))
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "ens", ens_overrides)
    monkeypatch.undo()
    member = member_ckpt(tmp_path / "ens", SEED).parents[1]
    assert json.loads((member / "metrics.json").read_text())["status"] == "interrupted"
    assert load(member_ckpt(tmp_path / "ens", SEED))["global_step"] == STEPS

    overrides = yaml.safe_load((member / ".hydra" / "overrides.yaml").read_text())
    train(compose_config("train", [*overrides, "resume=auto"], member))
    assert [p.name for p in (member / "checkpoints").iterdir()] == ["last.ckpt"]  # no -v1
    resumed = load(member / "checkpoints" / "last.ckpt")
    straight = load(
        run(tmp_path / "straight", [*common, f"seed={SEED}"]) / "checkpoints" / "last.ckpt"
    )
    assert resumed["global_step"] == straight["global_step"] == 2 * STEPS
    assert max_diff(resumed["state_dict"], straight["state_dict"]) < ATOL
    history = json.loads((member / "resume.json").read_text())
    assert json.loads((member / "metrics.json").read_text())["status"] == "completed", history
