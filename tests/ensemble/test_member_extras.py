"""Per-member training extras against the single runs: validation on Lightning's schedule, the
disentanglement callback's scores, and learning-rate schedulers (``ensemble/extras.py``)."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from latentzoo.ensemble.engine import StackedEnsemble
from latentzoo.ensemble.extras import ValidationSchedule, member_callbacks
from latentzoo.train import train
from latentzoo.utils.errors import LatentzooError
from tests.conftest import compose_config
from tests.ensemble.helpers import TINY_RUN, max_diff, model_overrides
from tests.ensemble.test_engine import batches, single_run, tiny

ATOL = 1e-4  # member vs single run weights (see test_ensemble_runs)


# --- learning-rate schedulers (engine level, fast) -----------------------------------------------
def step_lr(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.3)


def scheduled_single_run(seed: int) -> tuple[dict, dict]:
    """``test_engine.single_run`` plus the scheduler Lightning steps after each optimizer step."""
    model = tiny(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    scheduler = step_lr(optimizer)
    from latentzoo.callbacks.randomness import rank_seed

    torch.manual_seed(rank_seed(seed, 0))
    for x in batches(seed):
        loss = model.step(x, "train")["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
    return model.state_dict(), scheduler.state_dict()


def scheduled_engine(seeds: list[int]) -> StackedEnsemble:
    models = [tiny(s) for s in seeds]
    for m in models:
        m.optimizer_factory = lambda params: torch.optim.Adam(params, lr=1e-3)
        m.scheduler_factory = step_lr
    return StackedEnsemble(models, seeds, torch.device("cpu"))


def train_steps(engine: StackedEnsemble, seeds: list[int], steps: range) -> None:
    data = torch.stack([batches(s) for s in seeds], dim=1)
    for step in steps:
        engine.training_step(data[step], step)
        engine.step_schedulers(epoch_ended=False)


def test_a_step_scheduler_gives_every_member_its_single_runs_lr():
    seeds = [3, 7]
    engine = scheduled_engine(seeds)
    train_steps(engine, seeds, range(3))
    for k, seed in enumerate(seeds):
        ours = engine.member_state_dict(k)
        theirs, scheduler_state = scheduled_single_run(seed)
        assert max_diff(ours, theirs) < 1e-5
        assert max_diff(ours, single_run(seed)) > 1e-3  # the schedule matters at this tolerance
        assert engine.member_scheduler_states(k) == [scheduler_state]  # last.ckpt's layout


def test_scheduler_state_resumes_exactly():
    seeds = [0, 1]
    straight = scheduled_engine(seeds)
    train_steps(straight, seeds, range(3))
    first = scheduled_engine(seeds)
    train_steps(first, seeds, range(1))
    resumed = scheduled_engine(seeds)
    saved = [first.member_state(k) for k in range(2)]
    resumed.load_member_states(saved)
    train_steps(resumed, seeds, range(1, 3))
    for k in range(2):
        a, b = straight.member_state_dict(k), resumed.member_state_dict(k)
        assert all(torch.equal(a[n], b[n]) for n in a)
    assert resumed.schedulers[0].state_dict() == straight.schedulers[0].state_dict()
    unscheduled = StackedEnsemble([tiny(0), tiny(1)], seeds, torch.device("cpu"))
    with pytest.raises(LatentzooError, match="1 lr scheduler"):
        unscheduled.load_member_states(saved)


def test_a_dropped_member_keeps_the_schedule_of_its_last_finite_step():
    seeds = [0, 1]
    engine = scheduled_engine(seeds)
    data = torch.stack([batches(s) for s in seeds], dim=1)
    data[1, 1] = float("nan")  # member 1's batch at step 1
    for step, images in enumerate(data):
        engine.training_step(images, step)
        engine.step_schedulers(epoch_ended=False)
    assert engine.dropped[1]["step"] == 1
    assert engine.member_scheduler_states(0)[0]["last_epoch"] == 3
    assert engine.member_scheduler_states(1)[0]["last_epoch"] == 1  # stepped after step 0 only


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")
def test_epoch_schedulers_step_on_epoch_ends_only():
    engine = scheduled_engine([0, 1])
    engine.scheduler_interval = "epoch"
    lr = engine.optimizers[0].param_groups[0]["lr"]
    engine.step_schedulers(epoch_ended=False)
    assert engine.optimizers[0].param_groups[0]["lr"] == lr
    engine.step_schedulers(epoch_ended=True)
    assert engine.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.3 * lr)


def test_plateau_schedulers_are_refused():
    models = [tiny(0), tiny(1)]
    for m in models:
        m.scheduler_factory = lambda optimizer: torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer
        )
    with pytest.raises(LatentzooError, match="ReduceLROnPlateau") as error:
        StackedEnsemble(models, [0, 1], torch.device("cpu"))
    assert "\n" not in str(error.value)


# --- the validation schedule (Lightning's, fast) -------------------------------------------------
def schedule(batches_per_epoch: int, **trainer) -> ValidationSchedule:
    return ValidationSchedule(OmegaConf.create(trainer), batches_per_epoch)


def validated(s: ValidationSchedule, batches_per_epoch: int, steps: int) -> list[int]:
    """The global steps after which ``s`` validates in a run of ``steps`` steps."""
    return [
        step
        for step in range(1, steps + 1)
        if s.due(step, (step - 1) % batches_per_epoch + 1, (step - 1) // batches_per_epoch)
    ]


@pytest.mark.parametrize(
    ("trainer", "expected"),
    [
        # counted over the run (check_val_every_n_epoch=null, the latentzoo default)
        ({"val_check_interval": 3, "check_val_every_n_epoch": None}, [3, 6, 9]),
        # counted within each epoch: restarts at every epoch (4 batches each)
        ({"val_check_interval": 3, "check_val_every_n_epoch": 1}, [3, 7]),
        # a fraction of the epoch; every other epoch
        ({"val_check_interval": 0.5, "check_val_every_n_epoch": 2}, [6, 8]),
        # Lightning's defaults: at the end of every epoch
        ({}, [4, 8]),
        ({"val_check_interval": None, "check_val_every_n_epoch": None}, [4, 8]),
        ({"val_check_interval": 2, "limit_val_batches": 0}, []),
    ],
)
def test_validation_schedule_is_lightnings(trainer, expected):
    assert validated(schedule(4, **trainer), 4, 10) == expected


@pytest.mark.parametrize(
    ("trainer", "message"),
    [
        ({"val_check_interval": "00:00:10:00"}, "wall-clock"),
        ({"val_check_interval": 0.5, "check_val_every_n_epoch": None}, "fraction of an epoch"),
        ({"val_check_interval": 9, "check_val_every_n_epoch": 1}, "exceeds the 4 training"),
    ],
)
def test_validation_schedules_lightning_refuses(trainer, message):
    with pytest.raises(LatentzooError, match=message) as error:
        schedule(4, **trainer)
    assert "\n" not in str(error.value)


def test_callbacks_not_run_per_member_are_named_once(caplog):
    cfg = compose_config(
        "train", ["callbacks=disentanglement", "callbacks.disentanglement.metrics=[mig]"]
    )
    with caplog.at_level(logging.WARNING):
        per_member = member_callbacks(cfg.callbacks)
    assert [name for name, _ in per_member] == [  # in the single run's order
        "reconstruction_grid",
        "latent_traversal_grid",
        "sample_grid",
        "disentanglement",
    ]
    warned = [r.getMessage() for r in caplog.records if "ensemble: callbacks." in r.getMessage()]
    for name in ("learning_rate_monitor", "loss_report"):
        assert sum(f"callbacks.{name} " in line for line in warned) == 1, (name, warned)
    assert any("callbacks.model_checkpoint keeps only last.ckpt" in line for line in warned)
    assert len(warned) == 3, warned  # nothing about the bar, the scores or the grids


# --- validation, disentanglement and a scheduler through the train task (slow) -------------------
EXTRAS = [
    "trainer.max_steps=6",
    "trainer.limit_train_batches=4",  # epochs of 4 steps: the schedules cross an epoch
    "trainer.limit_val_batches=2",
    "+model.scheduler={_target_:torch.optim.lr_scheduler.StepLR,_partial_:true,step_size:2,"
    "gamma:0.2}",
    "+callbacks.disentanglement={_target_:latentzoo.metrics.ground_truth.DisentanglementCallback,"
    "every_n_steps:3,preset:fast,seed:0,metrics:[mig],overrides:{mig:{num_train:200}}}",
    "+callbacks.reconstruction_grid={_target_:latentzoo.callbacks.ReconstructionGrid,"
    "dirpath:'${paths.output_dir}/images',every_n_steps:3,num_images:4}",
    "+callbacks.sample_grid={_target_:latentzoo.callbacks.SampleGrid,"
    "dirpath:'${paths.output_dir}/images',every_n_steps:3,num_images:4}",
]
GRIDS = [f"{kind}_step{step:06d}.png" for kind in ("reconstructions", "samples") for step in (3, 6)]


def train_run(out: Path, overrides: list[str]):
    cfg = compose_config("train", [*TINY_RUN, *overrides], out)
    return train(cfg)


def logged_rows(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """{metric: [(step, value), ...]} of a run's CSV, in the order they were logged."""
    rows: dict[str, list[tuple[int, float]]] = {}
    with open(folder / "csv" / "version_0" / "metrics.csv") as handle:
        for row in csv.DictReader(handle):
            for key, value in row.items():
                if key not in ("step", "epoch") and value != "":
                    rows.setdefault(key, []).append((int(row["step"]), float(value)))
    return rows


def assert_same_rows(ours: list, theirs: list, rel: float, abs_: float = 0.0) -> None:
    assert [s for s, _ in ours] == [s for s, _ in theirs]
    assert [v for _, v in ours] == pytest.approx([v for _, v in theirs], rel=rel, abs=abs_)


EVERY_2 = (["trainer.val_check_interval=2"], [1, 3, 5])  # after steps 2, 4, 6; logged at step - 1
# 3 of each epoch's 4 batches: after step 3 (7 is past max_steps), after that step's grids
IN_EPOCH = (["trainer.val_check_interval=0.75", "trainer.check_val_every_n_epoch=1"], [2])


@pytest.mark.parametrize(
    ("model", "validation", "val_steps"),
    [
        # samples z in validation: the members' streams matter (~5 s: in the default suite)
        ("beta_tcvae", *IN_EPOCH),
        pytest.param("beta_tcvae", *EVERY_2, marks=pytest.mark.slow),
        pytest.param("lie_vae", *IN_EPOCH, marks=pytest.mark.slow),  # the per-member loop
        # two optimizers (manual optimisation), the scheduler on the VAE's
        pytest.param("factor_vae", *IN_EPOCH, marks=pytest.mark.slow),
    ],
)
def test_members_validate_score_and_schedule_as_their_single_runs(
    tmp_path, model, validation, val_steps
):
    seeds = [0, 1]
    common = [*model_overrides(model), *EXTRAS, *validation]
    _, objects = train_run(tmp_path / "ens", [*common, f"ensemble.seeds={seeds}"])
    ensemble = objects["ensemble"].ensemble
    scores = {}
    for k, s in enumerate(seeds):
        single, member = tmp_path / f"s{s}", tmp_path / "ens" / "members" / f"seed_{s}"
        train_run(single, [*common, f"seed={s}"])
        ckpt = torch.load(single / "checkpoints" / "last.ckpt", weights_only=False)
        # the scheduler: the same weights (lr 1e-3, then 2e-4 from step 2, 4e-5 from 4) and state
        assert max_diff(ensemble.member_state_dict(k), ckpt["state_dict"]) < ATOL
        assert ensemble.member_scheduler_states(k) == ckpt["lr_schedulers"]
        ours, theirs = logged_rows(member), logged_rows(single)
        # validation at the single run's steps, with its values
        for key in ("val/loss", "val/kl"):
            assert [step for step, _ in theirs[key]] == val_steps
            assert_same_rows(ours[key], theirs[key], rel=1e-4)
        # the disentanglement callback's scores: every 3 steps and at the end (logged twice)
        key = "disentanglement/fast/mig/mig"
        assert [step for step, _ in theirs[key]] == [3, 6, 6]
        assert_same_rows(ours[key], theirs[key], rel=0, abs_=1e-3)
        record = json.loads((member / "metrics.json").read_text())
        assert record["metrics"][key] == pytest.approx(theirs[key][-1][1], abs=1e-3)
        scores[s] = [v for _, v in theirs[key]]
        # the image grids: the single run's files, with its pixels
        assert sorted(p.name for p in (member / "images").iterdir()) == sorted(GRIDS)
        for name in GRIDS:
            assert pixel_diff(member / "images" / name, single / "images" / name) <= 1
    assert scores[0] != pytest.approx(scores[1], abs=1e-3)  # each member scores its own weights
    for name in GRIDS:  # and draws its own grids
        assert pixel_diff(tmp_path / "s0" / "images" / name, tmp_path / "s1" / "images" / name) > 1


def pixel_diff(a: Path, b: Path) -> int:
    from PIL import Image

    pixels = [torch.from_numpy(np.asarray(Image.open(p))).int() for p in (a, b)]
    return int((pixels[0] - pixels[1]).abs().max())
