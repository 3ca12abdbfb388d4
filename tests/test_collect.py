"""Sweep summaries: the run record train writes, and ``python -m latentzoo.collect`` over it."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

import latentzoo.collect as collect_module
from latentzoo.collect import collect, main, parse_overrides, summarize
from latentzoo.train import train
from latentzoo.utils import NonFiniteLossError
from tests.conftest import ROOT, TINY_DATA, TINY_TRAINER, compose_config, run_cli

# val/loss per (beta, seed): beta=4 seed=3 crashed
VAL_LOSS = {("1", 0): 10.0, ("1", 1): 12.5, ("1", 2): 11.0, ("4", 0): 20.0, ("4", 1): 23.0}
VAL_LOSS[("4", 2)] = 21.0


def make_run(
    path: Path, overrides: list[str], record: dict | None, config: dict | None = None
) -> Path:
    (path / ".hydra").mkdir(parents=True)
    (path / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if config is not None:
        (path / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    if record is not None:
        (path / "metrics.json").write_text(json.dumps(record))
    return path


@pytest.fixture
def fake_sweep(tmp_path: Path) -> Path:
    """Two configurations (model.beta=1, 4) x 3 seeds, one crashed run, one without a record."""
    sweep = tmp_path / "multiruns" / "2026-01-01_00-00-00"
    job = 0
    for (beta, seed), loss in VAL_LOSS.items():
        metrics = {"val/loss": loss, "test/loss": loss + seed, "train/loss": 2 * loss}
        if not (beta == "4" and seed == 2):  # one run never logged a disentanglement score
            metrics["disentanglement/mig"] = 0.1 * seed + float(beta)
        record = {"status": "completed", "global_step": 100, "metrics": metrics}
        overrides = [f"model.beta={beta}", f"seed={seed}", "paths.log_dir=/x"]
        make_run(sweep / str(job), overrides, record)
        job += 1
    make_run(
        sweep / str(job),
        ["model.beta=4", "seed=3", "paths.log_dir=/x"],
        {"status": "failed", "global_step": 7, "metrics": {}, "error": "RuntimeError: boom"},
    )
    make_run(sweep / str(job + 1), ["model.beta=1", "seed=3", "paths.log_dir=/x"], None)
    (sweep / "multirun.yaml").write_text("{}")
    return sweep


def test_parse_overrides() -> None:
    assert parse_overrides(["model.beta=4", "+x=a=b", "++y=1", "~callbacks.z"]) == {
        "model.beta": "4",
        "x": "a=b",
        "y": "1",
        "~callbacks.z": "<deleted>",
    }


def test_mean_std_grouping_and_failed_runs(fake_sweep: Path) -> None:
    summary = collect([fake_sweep], show=False)
    assert summary.keys == ["model.beta"]  # seed and the constant paths.log_dir are not keys
    assert [g.values for g in summary.groups] == [("1",), ("4",)]
    for group in summary.groups:
        (beta,) = group.values
        expected = np.array([VAL_LOSS[(beta, s)] for s in range(3)])
        mean, std, n = group.stats("val/loss")
        assert n == 3 and len(group.completed) == 3
        assert mean == pytest.approx(expected.mean())
        assert std == pytest.approx(np.std(expected, ddof=1))
    # a metric one run lacks: mean over the runs that have it, n says so
    mean, std, n = summary.groups[1].stats("disentanglement/mig")
    assert n == 2 and mean == pytest.approx(4.05) and std == pytest.approx(np.std([4, 4.1], ddof=1))
    problems = {(r.overrides["seed"], r.status, r.error) for r in summary.problems}
    assert ("3", "failed", "RuntimeError: boom") in problems
    assert any(seed == "3" and status == "missing" for seed, status, _ in problems)
    assert [len(g.runs) - len(g.completed) for g in summary.groups] == [1, 1]

    with (fake_sweep / "collect.csv").open() as file:
        rows = list(csv.DictReader(file))
    assert [row["model.beta"] for row in rows] == ["1", "4"]
    assert float(rows[1]["val/loss_mean"]) == pytest.approx(np.mean([20, 23, 21]))
    assert float(rows[1]["val/loss_std"]) == pytest.approx(np.std([20, 23, 21], ddof=1))
    assert rows[1]["n"] == "3" and rows[1]["failed"] == "1"
    markdown = (fake_sweep / "collect.md").read_text()
    assert "ddof=1" in markdown
    assert f"| 4 | 3 | 1 | {np.mean([4, 4.1]):.4g} ± " in markdown and "(n=2)" in markdown
    assert "RuntimeError: boom" in markdown and "seed=3" in markdown
    with (fake_sweep / "collect_runs.csv").open() as file:
        runs = list(csv.DictReader(file))
    assert len(runs) == 8 and {r["status"] for r in runs} == {"completed", "failed", "missing"}


def test_metric_selection_ignore_and_run_lists(fake_sweep: Path, tmp_path: Path) -> None:
    summary = summarize([fake_sweep], metrics=["val/*", "test/(loss|kl)"])
    assert summary.metrics == ["test/loss", "val/loss"]
    assert summarize([fake_sweep], ignore=["model.beta"]).keys == []
    # a list of run dirs, grouping all of them in one row
    one = summarize([fake_sweep / "0", fake_sweep / "1"])
    assert one.keys == [] and len(one.groups) == 1
    assert one.groups[0].stats("val/loss")[0] == pytest.approx(np.mean([10.0, 12.5]))
    # a key missing from some runs' overrides falls back to their saved config
    tree = tmp_path / "runs"
    for i, (overrides, beta) in enumerate([([], 4), ([], 4), (["model.beta=1"], 1)]):
        record = {"status": "completed", "metrics": {"val/loss": float(i)}}
        make_run(tree / f"run{i}", overrides, record, {"model": {"beta": beta}})
    groups = summarize([tree]).groups
    assert [(g.values, len(g.runs)) for g in groups] == [(("1",), 1), (("4",), 2)]


def test_cli_writes_outputs_with_prefix(fake_sweep: Path, tmp_path: Path) -> None:
    out = tmp_path / "summary" / "beta"
    assert main([str(fake_sweep), "--metrics", "val/loss", "--out", str(out)]) == 0
    header = (tmp_path / "summary" / "beta.csv").read_text().splitlines()[0]
    assert header == "model.beta,n,failed,val/loss_mean,val/loss_std,val/loss_n"
    assert (tmp_path / "summary" / "beta.md").is_file()
    assert main([str(tmp_path / "nothing_here")]) == 2
    assert main([str(fake_sweep), "--metrics", "no/such_metric"]) == 2


def test_train_writes_record_and_failure_record(tmp_path: Path, monkeypatch) -> None:
    from latentzoo.models import BetaVAE

    real_step = BetaVAE.step

    def poisoned_step(self, batch, stage):
        terms = real_step(self, batch, stage)
        if stage == "train" and self.global_step == 3:
            terms["loss"] = terms["loss"] * float("nan")
        return terms

    monkeypatch.setattr(BetaVAE, "step", poisoned_step)
    overrides = [*TINY_DATA, *TINY_TRAINER, "callbacks=model_checkpoint", "test=false"]
    cfg = compose_config("train", overrides, tmp_path)
    with pytest.raises(NonFiniteLossError):
        train(cfg)
    record = json.loads((tmp_path / "metrics.json").read_text())
    assert record["status"] == "failed" and record["global_step"] == 3
    assert record["error"].startswith("NonFiniteLossError:") and "global step 3" in record["error"]
    assert np.isfinite(record["metrics"]["train/loss"])  # what was logged before the crash
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "overrides.yaml").write_text("- seed=1\n")
    (problem,) = summarize([tmp_path]).problems
    assert problem.status == "failed" and "global step 3" in problem.error


def test_real_multirun_then_collect(tmp_path: Path) -> None:
    quick = [
        *TINY_DATA,
        *[o for o in TINY_TRAINER if "max_steps" not in o],
        "callbacks=model_checkpoint",
        "trainer.max_steps=2",
    ]
    result = run_cli("train.py", "-m", "seed=0,1", f"paths.log_dir={tmp_path}", *quick)
    assert result.returncode == 0, result.stderr[-3000:]
    (sweep,) = (tmp_path / "train" / "multiruns").iterdir()
    records = [json.loads((sweep / job / "metrics.json").read_text()) for job in ("0", "1")]
    assert all(r["status"] == "completed" and r["global_step"] == 2 for r in records)
    losses = np.array([r["metrics"]["test/loss"] for r in records])
    assert losses[0] != losses[1]  # the seeds differ

    done = subprocess.run(
        [sys.executable, "-m", "latentzoo.collect", str(sweep), "--metrics", "test/*"],
        cwd=ROOT,
        env={**os.environ, "COLUMNS": "200"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "test/loss" in done.stdout and "ddof=1" in done.stdout
    with (sweep / "collect.csv").open() as file:
        (row,) = list(csv.DictReader(file))
    assert row["n"] == "2" and row["failed"] == "0"
    assert float(row["test/loss_mean"]) == pytest.approx(losses.mean())
    assert float(row["test/loss_std"]) == pytest.approx(np.std(losses, ddof=1))


# ------------------------------------------------------------------- collect --eval (canonical)

EVAL = ["metrics=disentanglement"]
# the canonical scores per (beta, seed) that the fake eval.py reports
MIG = {("1", s): 0.2 + 0.1 * s for s in range(3)} | {("4", s): 0.4 + 0.05 * s for s in range(3)}


def _eval_record(ckpt: Path, beta: str, seed: int) -> dict:
    """An eval.py metrics.json: the canonical preset's keys, the protocol it ran with."""
    mig = MIG[(beta, seed)]
    metrics = {
        "test/loss": 50.0 + seed,
        "disentanglement/mig/mig": mig,
        "disentanglement/factor_vae/eval_accuracy": 2 * mig,
        "disentanglement/sap/sap": mig / 10,
    }
    protocol = {"preset": "default", "seed": 0, "settings": {"mig": {"num_train": 10000}}}
    return {
        "ckpt_path": str(ckpt.resolve()),
        "global_step": 100,
        "metrics": metrics,
        "protocols": {"disentanglement": protocol},
    }


def _write_eval(ckpt: Path, overrides, out_dir: Path) -> None:
    """What eval.py leaves in its run dir: .hydra/{overrides,config}.yaml and metrics.json."""
    run = ckpt.parent.parent
    train_overrides = parse_overrides(yaml.safe_load((run / ".hydra/overrides.yaml").read_text()))
    beta, seed = train_overrides["model.beta"], int(train_overrides["seed"])
    make_run(
        out_dir,
        [f"ckpt_path='{ckpt}'", *overrides],  # quoted, as collect's eval command line has it
        _eval_record(ckpt, beta, seed),
        {"task_name": "eval", "ckpt_path": str(ckpt)},
    )


@pytest.fixture
def trained_sweep(tmp_path: Path) -> Path:
    """2 configurations x 3 seeds of finished training runs with last.ckpt, in the layout train
    writes; training numbers (fast preset, best checkpoint) that collect --eval must not use;
    the first two runs already evaluated (an interrupted collect --eval); one crashed run."""
    sweep = tmp_path / "multiruns" / "2026-01-02_00-00-00"
    for job, (beta, seed) in enumerate(sorted(MIG)):
        run = sweep / str(job)
        metrics = {"test/loss": 99.0, "disentanglement/fast/mig/mig": 0.9}
        best = run / "checkpoints" / "step_000050.ckpt"
        record = {
            "status": "completed",
            "global_step": 100,
            "metrics": metrics,
            "best_model_path": str(best),
        }
        config = {"task_name": "train", "model": {"beta": float(beta)}, "seed": seed}
        make_run(run, [f"model.beta={beta}", f"seed={seed}"], record, config)
        (run / "checkpoints").mkdir()
        (run / "checkpoints" / "last.ckpt").write_bytes(b"weights")
        best.write_bytes(b"weights")
        if job < 2:
            ckpt = run / "checkpoints" / "last.ckpt"
            _write_eval(ckpt, EVAL, run / "eval" / collect_module.eval_tag("last", EVAL))
    crashed = {"status": "failed", "global_step": 7, "metrics": {}, "error": "RuntimeError: boom"}
    make_run(sweep / "6", ["model.beta=4", "seed=3"], crashed, {"task_name": "train"})
    return sweep


class FakeEval:
    """Stands in for the eval.py child process; counts what it was asked to evaluate."""

    def __init__(self) -> None:
        self.calls: list[Path] = []

    def __call__(self, ckpt: Path, overrides, out_dir: Path) -> tuple[bool, str]:
        self.calls.append(ckpt)
        _write_eval(ckpt, overrides, out_dir)
        return True, ""


def test_collect_eval_averages_canonical_numbers_over_seeds(trained_sweep: Path) -> None:
    fake = FakeEval()
    summary = collect([trained_sweep], eval_overrides=EVAL, runner=fake, show=False)
    # resumed: the two runs evaluated before are skipped; the crashed run is not evaluated
    assert sorted(p.parent.parent.name for p in fake.calls) == ["2", "3", "4", "5"]
    assert all(p.name == "last.ckpt" for p in fake.calls)  # final weights by default
    assert summary.keys == ["model.beta"]  # grouped by training overrides minus the seed
    assert [g.values for g in summary.groups] == [("1",), ("4",)]
    assert "disentanglement/fast/mig/mig" not in summary.metrics  # training numbers unused
    for group, beta in zip(summary.groups, ("1", "4"), strict=True):
        expected = [MIG[(beta, s)] for s in range(3)]
        mean, std, n = group.stats("disentanglement/mig/mig")
        assert n == 3 and mean == pytest.approx(np.mean(expected))
        assert std == pytest.approx(np.std(expected, ddof=1))
    (problem,) = summary.problems
    assert problem.status == "failed" and "not evaluated" in problem.error
    tables = json.loads((trained_sweep / "collect_last-metrics-disentanglement.json").read_text())
    assert tables["groups"][1]["disentanglement/mig/mig"]["n"] == 3
    # again: everything is evaluated, nothing runs
    again = FakeEval()
    collect([trained_sweep], eval_overrides=EVAL, runner=again, show=False)
    assert again.calls == []


def test_collect_eval_best_checkpoint_and_failures(trained_sweep: Path) -> None:
    def broken(ckpt: Path, overrides, out_dir: Path) -> tuple[bool, str]:
        return False, "Traceback ...\nLatentzooError: no factors"

    summary = collect([trained_sweep], eval_overrides=EVAL, ckpt="best", runner=broken, show=False)
    assert not summary.metrics and len(summary.problems) == 7
    assert any("LatentzooError: no factors" in (run.error or "") for run in summary.problems)


def test_clg_format_and_plain_collect_keep_eval_rows_apart(trained_sweep: Path) -> None:
    summary = collect(
        [trained_sweep], eval_overrides=EVAL, runner=FakeEval(), show=False, fmt="clg"
    )
    header, rows = summary.clg_rows()
    assert header[:4] == ["model.beta", "n", "FactorVAE", "β-VAE"]
    assert header[4:] == ["MIG", "DCI-D", "DCI-C", "DCI-I", "SAP", "modularity", "explicitness"]
    # beta=1: MIG 0.2, 0.3, 0.4 -> 30.0 (10.0) in percent; FactorVAE = 2 x MIG
    assert rows[0][2] == "60.0 (20.0)" and rows[0][4] == "30.0 (10.0)" and rows[0][3] == "—"
    assert rows[0][8] == "3.0 (1.0)"  # SAP
    assert (trained_sweep / "collect_last-metrics-disentanglement_clg.md").is_file()
    # a plain collect of the tree: eval rows grouped with their seeds, apart from training rows
    plain = summarize([trained_sweep])
    assert "evaluated" in plain.keys and "seed" not in plain.keys
    rows = {g.values: len(g.completed) for g in plain.groups}
    evaluated = plain.keys.index("evaluated")
    assert sorted(n for v, n in rows.items() if v[evaluated] == "last") == [3, 3]


# --------------------------------------------------------------------------- plots


def _write_csv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, ["epoch", "step", "train/loss", "val/loss"])
        writer.writeheader()
        writer.writerows(rows)


@pytest.fixture
def sweep_with_logs(fake_sweep: Path) -> Path:
    """CSV logs as Lightning's CSVLogger writes them: train/loss at steps 0, 5, 10 (L + 3,
    L + 1, L for the run's final val/loss L) and val/loss at step 10 in its own row. One run was
    resumed: version_0 logged a wrong step 10 that version_1 logged again."""
    for run in sorted(fake_sweep.iterdir()):
        record = run / "metrics.json"
        if not record.is_file() or json.loads(record.read_text())["status"] != "completed":
            continue
        final = json.loads(record.read_text())["metrics"]["val/loss"]
        rows = [{"epoch": 0, "step": s, "train/loss": final + d} for s, d in ((0, 3), (5, 1))]
        rows += [{"epoch": 0, "step": 10, "train/loss": final}, {"step": 10, "val/loss": final}]
        if run.name == "0":
            _write_csv(
                run / "csv/version_0/metrics.csv", [*rows[:2], {"step": 10, "train/loss": 999}]
            )
            _write_csv(run / "csv/version_1/metrics.csv", rows[2:])
        else:
            _write_csv(run / "csv/version_0/metrics.csv", rows)
    return fake_sweep


def test_plot_metric_vs_swept_key_has_mean_and_seed_std(sweep_with_logs: Path) -> None:
    from latentzoo.collect_plots import choose_x, metric_figure

    summary = summarize([sweep_with_logs], ignore=["paths.log_dir"])
    assert choose_x(summary) == "model.beta"
    axes = metric_figure(summary, "val/loss", "model.beta").axes[0]
    (bars,) = axes.containers
    np.testing.assert_allclose(bars.lines[0].get_xydata(), [[1, 11.166666], [4, 21.333333]], 1e-6)
    segments = bars.lines[2][0].get_segments()  # the vertical error bars: mean ∓ std
    std1, std4 = np.std([10, 12.5, 11], ddof=1), np.std([20, 23, 21], ddof=1)
    np.testing.assert_allclose(segments[0][:, 1], [11.166666 - std1, 11.166666 + std1], 1e-6)
    np.testing.assert_allclose(segments[1][:, 1], [21.333333 - std4, 21.333333 + std4], 1e-6)
    dots = sorted(axes.collections[-1].get_offsets()[:, 1])  # every seed
    assert dots == [10, 11, 12.5, 20, 21, 23]
    assert axes.get_xlabel() == "model.beta" and axes.get_ylabel() == "val/loss"
    assert "n=3 seeds" in axes.get_legend().get_texts()[0].get_text()


def test_plot_training_curves_are_mean_and_std_bands(sweep_with_logs: Path) -> None:
    from latentzoo.collect_plots import curve_figure

    summary = summarize([sweep_with_logs], ignore=["paths.log_dir"])
    axes = curve_figure(summary, "train/loss").axes[0]
    assert [t.get_text() for t in axes.get_legend().get_texts()] == [
        "model.beta=1 (n=3)",
        "model.beta=4 (n=3)",
    ]
    for line, band, finals in zip(
        axes.lines, axes.collections, ([10, 12.5, 11], [20, 23, 21]), strict=True
    ):
        mean, std = np.mean(finals), np.std(finals, ddof=1)
        np.testing.assert_allclose(line.get_xydata(), [[0, mean + 3], [5, mean + 1], [10, mean]])
        vertices = band.get_paths()[0].vertices
        at_10 = vertices[np.isclose(vertices[:, 0], 10), 1]
        np.testing.assert_allclose(sorted(set(np.round(at_10, 9))), [mean - std, mean + std])
    assert axes.get_xlabel() == "training step" and curve_figure(summary, "val/loss") is None


def test_collect_plot_writes_pngs(sweep_with_logs: Path, capsys) -> None:
    from PIL import Image

    assert main([str(sweep_with_logs), "--ignore", "paths.log_dir", "--plot"]) == 0
    plots = sweep_with_logs / "collect_plots"
    written = sorted(str(p.relative_to(plots)) for p in plots.rglob("*.png"))
    assert written == [
        "curves/train_loss.png",
        "disentanglement_mig_vs_model.beta.png",
        "test_loss_vs_model.beta.png",
        "train_loss_vs_model.beta.png",
        "val_loss_vs_model.beta.png",
    ]
    for name in written:
        with Image.open(plots / name) as image:
            assert image.format == "PNG" and image.size[0] > 400
    assert "plots (5) in" in capsys.readouterr().out
    assert main([str(sweep_with_logs), "--plot", "--plot-x", "lr"]) == 2
    assert "--plot-x lr is not a swept key" in capsys.readouterr().err
