"""The compatibility matrix, end to end through the CLI (issue 22).

Every model x every data config: an accepted pair composes and passes the family check; a
rejected pair is refused with one line naming the accepted families. One dataset per accepted
(model, family) -- procedural, plus one real-format config per family on small files written
here -- trains 2 steps with the DEFAULT callbacks through ``python train.py``, validates, tests,
writes its checkpoint and pictures, and is evaluated by ``python eval.py ckpt_path=...``.

Cost: models whose tiny run needs no model override share one ``train.py -m`` sweep per dataset
(one Python start for several runs; each run is still the CLI's own job), and every evaluation is
one ``eval.py -m ckpt_path=a,b,...`` sweep. The matrix is written to
benchmarks/results/compat_matrix.json by the last test.
"""

from __future__ import annotations

import json
import platform
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from omegaconf import OmegaConf

from latentzoo.utils.compat import (
    FAMILIES,
    check_compatible,
    check_pair,
    data_family,
    model_accepts,
)
from latentzoo.utils.errors import LatentzooError
from tests.conftest import ROOT, compose_config, run_cli
from tests.data.test_real_datasets import DSPRITES_SIZES, write_dsprites, write_pngs

CONFIGS = ROOT / "configs"
RESULT = ROOT / "benchmarks" / "results" / "compat_matrix.json"


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


def target(group: str, name: str) -> str:
    """The ``_target_`` of a config, following its ``defaults`` parent if it names none."""
    cfg = yaml.safe_load((CONFIGS / group / f"{name}.yaml").read_text())
    if "_target_" in cfg:
        return cfg["_target_"]
    parent = next(d for d in cfg["defaults"] if isinstance(d, str) and d != "_self_")
    return target(group, parent)


MODELS = options("model")
DATA = options("data")
FAMILY = {d: data_family(target("data", d)) for d in DATA}
ACCEPTS = {m: model_accepts(target("model", m)) for m in MODELS}
ACCEPTED = [(m, d) for m in MODELS for d in DATA if FAMILY[d] in ACCEPTS[m]]
REJECTED = [(m, d) for m in MODELS for d in DATA if FAMILY[d] not in ACCEPTS[m]]

# ---------------------------------------------------------------- tiny end-to-end runs
# Trainer: 2 steps, validation at step 2, one val/test batch; callbacks stay the defaults.
TRAINER = [
    "trainer.accelerator=cpu",
    "trainer.max_steps=2",
    "trainer.val_check_interval=2",
    "trainer.limit_val_batches=1",
    "trainer.limit_test_batches=1",
    "trainer.log_every_n_steps=1",
    "extras.print_config=false",
]
SMALL_GRID = ["data.dataset.size=small", "data.val_size=8", "data.test_size=8", "data.batch_size=4"]
# the dataset run end to end per family: procedural ones, then real-format on written files
DATA_RUN = {
    "proc_dsprites": SMALL_GRID,
    "proc_blobs": [
        "data.image_size=32",
        "data.num_train=16",
        "data.num_val=8",
        "data.num_test=8",
        "data.batch_size=4",
    ],
    "proc_cifar": [
        "data.num_train=32",
        "data.num_test=8",
        "data.val_size=8",
        "data.batch_size=4",
    ],
    "proc_multishapes": [  # 64 px: its shapes of 11-13 px do not fit smaller images
        "data.num_train=16",
        "data.num_val=8",
        "data.num_test=8",
        "data.batch_size=4",
    ],
    "proc_dsprites_seq": [
        "data.source.dataset.size=small",
        "data.seq_len=2",
        "data.batch_size=4",
        "data.epoch_size=16",
        "data.val_per_k=2",
        "data.test_per_k=2",
    ],
    # real-format: files written by the `files` fixture under <data_dir>
    "dsprites": [
        *SMALL_GRID[1:],
        "data.dataset.checksum=null",
        f"+data.dataset.factor_sizes=[{','.join(map(str, DSPRITES_SIZES))}]",
    ],
    "image_folder": ["data.image_size=32", "data.val_size=8", "data.batch_size=4"],
    "clevrer": ["data.image_size=32", "data.batch_size=4"],
    "sk_digits": ["data.batch_size=16", "data.image_size=8"],
}
# real-format dataset -> the model that runs on it (sk_digits: real data shipped with sklearn)
REAL_FORMAT = {"dsprites": "beta_vae", "image_folder": "kl_autoencoder", "clevrer": "dlp"}
REAL_FORMAT["sk_digits"] = "nfpi"
# small nets; models not listed run their default architecture
MODEL_RUN = {
    "kl_autoencoder": ["model.net.ch=8"],
    "latent_fm": ["model/backbone=dit_tiny", "model/autoencoder=identity"],
    "nfpi": [
        "model.flow.levels=1",
        "model.flow.steps=[1]",
        "model.flow.blocks=[1]",
        "model.flow.hidden=8",
        "model.init_images=32",
    ],
    "soft_intro_vae": ["model.channels=[8,16,32]", "model.latent_dim=8"],
    "dlp": [
        "model.n_kp=4",
        "model.n_kp_prior=6",
        "model.enc_channels=[8,16,16]",
        "model.prior_channels=[8,8,8]",
        "model.dec_channels=[16,8,8]",
    ],
    "latent_flow": ["model.latent_dim=8"],
}


def end_to_end() -> list[tuple[str, str]]:
    """One run per accepted (model, family) on its procedural dataset, plus each real-format
    dataset with the first model that accepts its family."""
    runs, covered = [], set()
    for data in DATA_RUN:
        models = [m for m in MODELS if FAMILY[data] in ACCEPTS[m]]
        if data in REAL_FORMAT:
            models = [REAL_FORMAT[data]]
        for model in models:
            if data not in REAL_FORMAT and (model, FAMILY[data]) in covered:
                continue
            covered.add((model, FAMILY[data]))
            runs.append((model, data))
    return runs


RUNS = end_to_end()
OUTCOMES: dict[tuple[str, str], str] = {}


def write_files(data_dir: Path) -> None:
    """Small real-format datasets, laid out where the data configs look for them."""
    write_dsprites(data_dir / "dsprites")
    write_pngs(data_dir / "images", 24, 32)
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, size=(48, 32, 32, 3), dtype=np.uint8)
    (data_dir / "clevrer").mkdir(parents=True)
    np.save(data_dir / "clevrer" / "clevrer_frames_128.npy", frames)


@pytest.fixture(scope="module")
def matrix_runs(tmp_path_factory) -> dict:
    """Train every end-to-end pair, then evaluate every checkpoint; returns the run dirs and
    the output of the processes (for failure messages)."""
    base = tmp_path_factory.mktemp("matrix")
    write_files(base / "data")
    common = [*TRAINER, f"paths.data_dir={base / 'data'}", f"paths.log_dir={base / 'logs'}"]
    groups: dict[tuple, list[str]] = {}
    for model, data in RUNS:
        groups.setdefault((data, tuple(MODEL_RUN.get(model, []))), []).append(model)
    start = time.perf_counter()
    dirs, logs = {}, {}
    for (data, model_overrides), models in groups.items():
        sweep = base / "train" / data / str(len(dirs))
        args = [
            f"model={','.join(models)}",
            f"data={data}",
            *DATA_RUN[data],
            *model_overrides,
            *common,
            f"hydra.sweep.dir={sweep}",
            "hydra.sweep.subdir=${hydra.runtime.choices.model}",
        ]
        output = _run("train.py", "-m", *args)
        for model in models:
            dirs[model, data] = sweep / model
            logs[model, data] = output
    ckpts = {
        pair: run / "checkpoints" / "last.ckpt"
        for pair, run in dirs.items()
        if (run / "checkpoints" / "last.ckpt").is_file()
    }
    evals = {}
    if ckpts:
        sweep = base / "eval"
        output = _run(
            "eval.py",
            "-m",
            f"ckpt_path={','.join(str(c) for c in ckpts.values())}",
            "trainer.accelerator=cpu",
            "trainer.limit_test_batches=1",
            "extras.print_config=false",
            f"paths.log_dir={base / 'logs'}",
            f"hydra.sweep.dir={sweep}",
        )
        for number, pair in enumerate(ckpts):
            evals[pair] = sweep / str(number)
            logs[pair] += "\n--- eval ---\n" + output
    return {"train": dirs, "eval": evals, "logs": logs, "wall_s": time.perf_counter() - start}


def _run(script: str, *args: str) -> str:
    """Run the CLI; its output tail (a hung run is stopped, and its pairs then fail)."""
    try:
        result = run_cli(script, *args, timeout=240)
    except subprocess.TimeoutExpired:
        return f"{script} timed out after 240 s"
    return result.stdout[-3000:] + result.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("model,data", RUNS)
def test_accepted_pair_trains_and_evaluates(model: str, data: str, matrix_runs: dict) -> None:
    """train.py with the default callbacks: completed run, checkpoint, pictures; eval.py on it."""
    OUTCOMES[model, data] = "fail"
    run, log = matrix_runs["train"][model, data], matrix_runs["logs"][model, data]
    record = run / "metrics.json"
    assert record.is_file(), f"no run record for {model} x {data}:\n{log}"
    status = json.loads(record.read_text())
    assert status["status"] == "completed", f"{model} x {data}: {status.get('error')}\n{log}"
    assert any(k.startswith("val/") for k in status["metrics"]), f"no validation: {status}"
    assert any(k.startswith("test/") for k in status["metrics"]), f"no test: {status}"
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert list((run / "images").glob("*.png")), f"{model} x {data}: no pictures in {run}"
    evaluation = matrix_runs["eval"].get((model, data))
    assert evaluation is not None and (evaluation / "metrics.json").is_file(), f"eval:\n{log}"
    report = json.loads((evaluation / "metrics.json").read_text())
    assert Path(report["ckpt_path"]) == (run / "checkpoints" / "last.ckpt").resolve()
    OUTCOMES[model, data] = "pass"


@pytest.mark.parametrize("model,data", ACCEPTED)
def test_accepted_pair_composes(model: str, data: str, tmp_path: Path) -> None:
    """Every accepted pair composes and passes the family check (the run above covers one
    dataset per family; the others differ only in files the datamodule reads)."""
    cfg = compose_config("train", [f"model={model}", f"data={data}"], tmp_path)
    check_pair(cfg)
    OUTCOMES.setdefault((model, data), "accept")


@pytest.mark.parametrize("model,data", REJECTED)
def test_rejected_pair_is_refused(model: str, data: str) -> None:
    """The check on the config targets (composition itself is covered by test_configs)."""
    model_cfg = OmegaConf.create({"_target_": target("model", model)})
    data_cfg = OmegaConf.create({"_target_": target("data", data)})
    with pytest.raises(LatentzooError) as error:
        check_compatible(model_cfg, data_cfg, {"model": model, "data": data})
    message = str(error.value)
    assert "\n" not in message and f"model={model}" in message and f"data={data}" in message
    assert all(family in message for family in ACCEPTS[model])
    OUTCOMES[model, data] = "refuse"


# through the CLI: the pair and one factor-set model on sequences (the message comes
# from one function; the test above checks it for every rejected pair)
CLI_REJECTED = [("latent_flow", "proc_blobs"), ("beta_vae", "proc_dsprites_seq")]


def test_readme_shows_the_declared_matrix() -> None:
    """The README's family table lists, per family, exactly the models that accept it."""
    rows = {
        line.split("|")[1].strip(" `"): line.split("|")[3]
        for line in (ROOT / "README.md").read_text().splitlines()
        if line.startswith("| `") and line.split("|")[1].strip(" `") in FAMILIES
    }
    assert set(rows) == set(FAMILIES)
    for family, cell in rows.items():
        listed = {name.strip(" `") for name in cell.split(",")}
        assert listed == {m for m in MODELS if family in ACCEPTS[m]}, family


@pytest.mark.slow
@pytest.mark.parametrize("model,data", CLI_REJECTED)
def test_rejected_pair_stops_with_one_line(model: str, data: str, tmp_path: Path) -> None:
    result = run_cli(
        "train.py", f"model={model}", f"data={data}", f"hydra.run.dir={tmp_path}", timeout=120
    )
    output = (result.stdout + result.stderr).strip().splitlines()
    assert result.returncode == 2, result.stdout + result.stderr
    assert len(output) == 1 and output[0].startswith("error: "), output
    assert all(family in output[0] for family in ACCEPTS[model]), output[0]
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.slow
def test_eval_refuses_a_dataset_the_model_does_not_accept(matrix_runs: dict) -> None:
    """eval.py data=... on another family stops in one line, before building data."""
    pair = next(p for p in matrix_runs["eval"] if p[0] == "beta_vae")
    ckpt = matrix_runs["train"][pair] / "checkpoints" / "last.ckpt"
    result = run_cli("eval.py", f"ckpt_path={ckpt}", "data=proc_dsprites_seq", timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and "accepts factor_sets, images" in errors[0], errors
    assert "Traceback" not in result.stdout + result.stderr


def static_outcome(model: str, data: str) -> str:
    """ "not run" for a pair that should have run end to end, else "accept" or "refuse"."""
    if (model, data) in RUNS:
        return "not run"
    model_cfg = OmegaConf.create({"_target_": target("model", model)})
    data_cfg = OmegaConf.create({"_target_": target("data", data)})
    try:
        check_compatible(model_cfg, data_cfg)
    except LatentzooError:
        return "refuse"
    return "accept"


@pytest.mark.slow
def test_write_matrix(matrix_runs: dict) -> None:
    """The matrix (models x datasets: pass / accept / refuse / fail) as JSON and a table."""
    assert set(FAMILY.values()) <= set(FAMILIES), "a data config outside the declared families"
    # end-to-end cells come from the runs above; the others from the family check on the
    # config targets (the fast tests compose every accepted pair and refuse every other)
    cells = {m: {d: OUTCOMES.get((m, d)) or static_outcome(m, d) for d in DATA} for m in MODELS}
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(
        json.dumps(
            {
                "command": "pytest tests/test_matrix.py",
                "device": f"cpu ({platform.processor() or platform.machine()})",
                "legend": {
                    "pass": "trained 2 steps via train.py (default callbacks), tested, "
                    "checkpoint + pictures, evaluated via eval.py",
                    "accept": "accepted family: composes and passes the check (not run end to end)",
                    "refuse": "stopped at composition with one line (exit 2)",
                    "fail": "accepted but the end-to-end run failed",
                },
                "families": {d: FAMILY[d] for d in DATA},
                "accepts": {m: list(ACCEPTS[m]) for m in MODELS},
                "real_format_runs": sorted(REAL_FORMAT),
                "cli_runs_wall_s": round(matrix_runs["wall_s"], 1),
                "matrix": cells,
            },
            indent=2,
        )
    )
    width = max(map(len, DATA))
    print("\n" + " " * width + " " + " ".join(m[:11].rjust(11) for m in MODELS))
    for d in DATA:
        print(d.ljust(width) + " " + " ".join(cells[m][d].rjust(11) for m in MODELS))
    assert all(cells[m][d] != "not run" for m in MODELS for d in DATA)
