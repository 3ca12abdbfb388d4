"""Ensembles through the train task against the single runs ``train.py seed=s`` they stand for.

Tolerance: after 3 Adam steps a vmapped member differs from its single run by < 2e-5 (grouped
convolutions sum in another order; Adam divides by √v, so a first-step gradient rounding shows
as ~lr·1e-2); the loop path (the default on CPU) is bit-exact for LieVAE. Different seeds differ
by > 0.1.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
import yaml

from latentzoo.ensemble import members_of
from latentzoo.ensemble import run as ensemble_run
from latentzoo.ensemble.members import ensemble_argv
from latentzoo.ensemble.run import check_ensemble
from latentzoo.utils.checkpoint_io import TrainingInterrupted
from latentzoo.utils.errors import LatentzooError
from tests.conftest import ROOT, compose_config
from tests.ensemble.helpers import max_diff, model_overrides, run, weights

ATOL = 1e-4


def member_ckpt(root, seed):
    return root / "members" / f"seed_{seed}" / "checkpoints" / "last.ckpt"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("model", "vectorize"),
    # auto is the member-by-member loop on CPU; vmap (the GPU path) is checked here too, except
    # for LieVAE's per-batch flips, which branch on noise and always loop
    [(m, v) for m in ("beta_vae", "beta_tcvae", "factor_vae") for v in ("auto", "vmap")]
    + [("lie_vae", "auto")],
)
def test_member_is_the_single_run(tmp_path, model, vectorize):
    seeds = [0, 1]
    ens = run(
        tmp_path / "ens",
        [*model_overrides(model), f"ensemble.seeds={seeds}", f"ensemble.vectorize={vectorize}"],
    )
    singles = {s: run(tmp_path / f"s{s}", [*model_overrides(model), f"seed={s}"]) for s in seeds}
    for s in seeds:
        ours = weights(member_ckpt(ens, s))
        assert max_diff(ours, weights(singles[s] / "checkpoints" / "last.ckpt")) < ATOL
        other = weights(singles[1 - s] / "checkpoints" / "last.ckpt")
        assert max_diff(ours, other) > 100 * ATOL  # the seeds are told apart
        record = json.loads((ens / "members" / f"seed_{s}" / "metrics.json").read_text())
        assert record["status"] == "completed" and record["global_step"] == 3
        assert (ens / "members" / f"seed_{s}" / "csv" / "version_0" / "metrics.csv").is_file()


@pytest.mark.slow
def test_varied_beta_equals_runs_with_that_beta(tmp_path):
    betas = [1.0, 16.0]
    ens = run(
        tmp_path / "ens",
        [
            *model_overrides("beta_vae"),
            "ensemble.seeds=[0,1]",
            f"+ensemble.vary.model.beta={betas}",
        ],
    )
    for s, beta in zip([0, 1], betas, strict=True):
        single = run(
            tmp_path / f"s{s}", [*model_overrides("beta_vae"), f"seed={s}", f"model.beta={beta}"]
        )
        assert (
            max_diff(weights(member_ckpt(ens, s)), weights(single / "checkpoints" / "last.ckpt"))
            < ATOL
        )
        overrides = yaml.safe_load(
            (ens / "members" / f"seed_{s}" / ".hydra" / "overrides.yaml").read_text()
        )
        assert f"model.beta={beta}" in overrides and f"seed={s}" in overrides
        assert not any(o.startswith(("ensemble", "+ensemble")) for o in overrides)


@pytest.mark.slow
def test_ensemble_resume_is_exact(tmp_path):
    common = [*model_overrides("beta_tcvae"), "ensemble.seeds=[0,1]"]
    straight = run(tmp_path / "straight", [*common, "trainer.max_steps=4"])
    first = run(tmp_path / "first", [*common, "trainer.max_steps=2"])
    ckpt = first / "checkpoints" / "ensemble_last.ckpt"
    resumed = run(tmp_path / "resumed", [*common, "trainer.max_steps=4", f"ckpt_path={ckpt}"])
    for s in (0, 1):
        a, b = weights(member_ckpt(straight, s)), weights(member_ckpt(resumed, s))
        assert all(torch.equal(a[k], b[k]) for k in a), s
        half = weights(member_ckpt(first, s))
        assert max_diff(a, half) > 0  # the resumed half did train


@pytest.mark.slow
def test_ctrl_c_saves_at_a_step_boundary_and_resumes_exactly(tmp_path, monkeypatch):
    common = [*model_overrides("beta_vae"), "ensemble.seeds=[0,1]", "trainer.max_steps=5"]
    straight = run(tmp_path / "straight", common)
    fetches, images = iter(range(10**6)), ensemble_run._images

    def signalled_while_fetching(batches, device):
        if next(fetches) == 2:  # the batch of step 3: the signal lands inside a step
            os.kill(os.getpid(), signal.SIGINT)
        return images(batches, device)

    monkeypatch.setattr(ensemble_run, "_images", signalled_while_fetching)
    with pytest.raises(TrainingInterrupted, match="SIGINT at global step 3") as stopped:
        run(tmp_path / "stopped", common)
    monkeypatch.undo()
    assert stopped.value.code == 130  # 128 + SIGINT, as a single run exits
    ckpt = tmp_path / "stopped" / "checkpoints" / "ensemble_last.ckpt"
    assert torch.load(ckpt, weights_only=True)["global_step"] == 3
    record = json.loads((tmp_path / "stopped" / "members" / "seed_0" / "metrics.json").read_text())
    assert record["status"] == "interrupted" and record["global_step"] == 3
    resumed = run(tmp_path / "stopped", [*common, f"ckpt_path={ckpt}"])
    for s in (0, 1):
        a, b = weights(member_ckpt(straight, s)), weights(member_ckpt(resumed, s))
        assert all(torch.equal(a[k], b[k]) for k in a), s


@pytest.mark.slow
def test_collect_sees_members_as_the_separate_runs(tmp_path):
    seeds = [0, 1, 2]
    overrides = model_overrides("beta_vae")
    ens = run(tmp_path / "ens", [*overrides, f"ensemble.seeds={seeds}"])
    sweep = tmp_path / "sweep"
    for s in seeds:  # what `train.py -m seed=0,1,2` leaves: .hydra/overrides.yaml per run
        out = run(sweep / str(s), [*overrides, f"seed={s}"])
        (out / ".hydra").mkdir()
        (out / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([*overrides, f"seed={s}"]))
    tables = {}
    for name, root in {"ens": ens / "members", "sweep": sweep}.items():
        subprocess.run(
            [sys.executable, "-m", "latentzoo.collect", str(root), "--out", str(tmp_path / name)],
            cwd=ROOT,
            check=True,
            capture_output=True,
        )
        tables[name] = json.loads((tmp_path / f"{name}.json").read_text())
    ens_rows, sweep_rows = tables["ens"], tables["sweep"]
    ens_metrics = _train_stats(ens_rows)
    sweep_metrics = _train_stats(sweep_rows)
    assert ens_metrics.keys() == sweep_metrics.keys() and ens_metrics
    for key, (mean, std, n) in ens_metrics.items():
        other = sweep_metrics[key]
        assert n == other[2] == len(seeds)
        assert mean == pytest.approx(other[0], rel=1e-4) and std == pytest.approx(
            other[1], rel=1e-2, abs=1e-3
        )


def _train_stats(table):
    """{metric: (mean, std, n)} of the one group of ``collect``'s JSON, train/* metrics."""
    groups = table["groups"]
    assert len(groups) == 1
    return {
        key: (value["mean"], value["std"], value["n"])
        for key, value in groups[0].items()
        if key.startswith("train/")
    }


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model=nfpi", "data=proc_digits", "ensemble.seeds=[0,1]"], "not latentzoo.models.NFPI"),
        (["trainer=fsdp", "ensemble.seeds=[0,1]"], "strategy=fsdp is not supported"),
        (["trainer=ddp_sim", "ensemble.seeds=[0]"], "1 members cannot fill 2 devices"),
        (["ensemble.seeds=[0,0]"], "repeated seeds"),
        (["ensemble.seeds='range(x)'"], "not understood"),
        (["ensemble.seeds=[0,1]", "+ensemble.vary.model.beta=[1]"], "1 values for 2 seeds"),
        (["ensemble.seeds=[0,1]", "+ensemble.vary.trainer.max_steps=[1,2]"], "loss weights"),
    ],
)
def test_what_the_ensemble_refuses(overrides, message):
    cfg = compose_config("train", overrides)
    with pytest.raises(LatentzooError, match=message) as error:
        check_ensemble(cfg)
    assert "\n" not in str(error.value)


def test_range_seeds_and_member_configs():
    cfg = compose_config(
        "train", ["ensemble.seeds='range(2,5)'", "ensemble.vary={model.beta:[1,2,3]}"]
    )
    members = members_of(cfg)
    assert [m.seed for m in members] == [2, 3, 4]
    assert [m.cfg.model.beta for m in members] == [1, 2, 3]
    assert all(m.cfg.seed == m.seed and m.cfg.ensemble is None for m in members)


@pytest.mark.parametrize(
    ("shell_word", "hydra_word"),
    [
        ("ensemble.seeds=range(10)", "ensemble.seeds='range(10)'"),
        ("ensemble.seeds=range(2,5)", "ensemble.seeds='range(2,5)'"),
        ("ensemble.seeds=[0,1]", "ensemble.seeds=[0,1]"),
        ("ensemble.vary.model.beta=[1,2]", "+ensemble.vary.model.beta=[1,2]"),
        ("+ensemble.vary.model.beta=[1,2]", "+ensemble.vary.model.beta=[1,2]"),
        ("seed=range(3)", "seed=range(3)"),  # a sweep of single runs stays a sweep
    ],
)
def test_ensemble_shorthands_on_the_command_line(shell_word, hydra_word):
    assert ensemble_argv(["train.py", shell_word]) == ["train.py", hydra_word]


def test_ensemble_shorthands_compose():
    words = ["ensemble.seeds=range(2,4)", "ensemble.vary.model.beta=[1,8]"]
    members = members_of(compose_config("train", ensemble_argv(words)))
    assert [(m.seed, m.cfg.model.beta) for m in members] == [(2, 1), (3, 8)]
