"""Summarise a sweep: mean ± std of each run's final metrics per configuration.

    python train.py -m experiment=beta_vae_proc_dsprites seed=0,1,2,3,4
    python -m latentzoo.collect logs/train/multiruns/<time>
    python -m latentzoo.collect logs/train/multiruns/<time> --eval metrics=disentanglement

``--eval OVERRIDES`` first evaluates every finished training run's chosen checkpoint
(``--ckpt last``, the final weights, as disentanglement_lib; or ``best``) with ``eval.py`` and
those overrides, into ``<run>/eval/<ckpt>-<overrides>/``; runs evaluated before with the same
checkpoint are skipped, so an interrupted collect resumes. The table then holds the eval
numbers (e.g. the canonical disentanglement preset), grouped by the training overrides.
Eval run dirs found anywhere are grouped by the overrides of the training run that wrote their
checkpoint (not by ``ckpt_path``), so seeds average. ``--format clg`` also writes the CLG-VAE
paper's layout (percent, one decimal, its column order).

Each run dir (one with ``.hydra/overrides.yaml``) contributes its ``metrics.json`` (written by
the train task at the end of a run, or with status ``failed`` when it crashed). Runs are grouped
by the overrides that vary across runs, except ``seed`` and ``--ignore`` keys; per group the
mean and sample standard deviation (ddof=1) of every selected metric are written to
``<out>.csv``, ``<out>.json`` and ``<out>.md`` (default ``<out>`` = ``<sweep>/collect``), one
row per run to ``<out>_runs.csv``, and the table is printed. ``--plot`` adds PNGs in
``<out>_plots/``: each metric against the swept hyper-parameter and the training curves of
the CSV logs, mean ± std over seeds (:mod:`latentzoo.collect_plots`). Failed or unfinished runs are
listed, not dropped.

Each run's state is printed next to its metrics: ``finished``, ``failed``, ``interrupted``
(Ctrl-C / SIGTERM), or ``running or killed`` (no ``metrics.json``: a run writes it when it ends,
and a new attempt clears the previous one's), with ``(resumed N×)`` when ``resume.json`` says it
continued from its own checkpoint N times (``resume=auto``).
"""

from __future__ import annotations

import argparse
import csv
import fnmatch
import json
import math
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

METRICS_FILE = "metrics.json"
ALWAYS_IGNORED = ("seed",)
MISSING = "—"
RESUME_FILE = "resume.json"  # latentzoo.utils.resume: the run's starts and resume count
STATES = {"completed": "finished", "missing": "no metrics"}
EVAL_DIR = "eval"  # <train run>/eval/<ckpt>-<overrides>/: collect --eval's eval runs
EVAL_IGNORED = ("ckpt_path", "hydra.*")  # eval overrides that say where, not what
# The CLG-VAE paper's columns (lie_vae.md §8): (header, score keys in order of preference)
CLG_COLUMNS = (
    ("FactorVAE", ("factor_vae/eval_accuracy",)),
    ("β-VAE", ("beta_vae/eval_accuracy",)),
    ("MIG", ("mig/mig",)),
    ("DCI-D", ("dci/disentanglement",)),
    ("DCI-C", ("dci/completeness",)),
    ("DCI-I", ("dci/informativeness_test",)),
    ("SAP", ("sap/sap", "sap/sap_continuous")),
    ("modularity", ("modularity/modularity",)),
    ("explicitness", ("modularity/explicitness_test",)),
)


@dataclass
class Run:
    """One run dir: its overrides, final metrics and outcome."""

    path: Path
    overrides: dict[str, str]
    status: str  # completed | failed | interrupted | missing
    metrics: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    global_step: int | None = None
    config: dict[str, Any] | None = None
    resumed: int = 0  # starts that continued from the run's own checkpoint (resume.json)
    record: dict[str, Any] | None = None  # the metrics.json as written
    evaluates: str | None = None  # an eval run: the checkpoint it evaluated

    @property
    def ok(self) -> bool:
        return self.status == "completed" and bool(self.metrics)

    @property
    def state(self) -> str:
        """``finished``, ``failed``, ``interrupted`` or ``running or killed`` (no record), with
        ``(resumed N×)`` when the run continued from its own checkpoint."""
        if self.status == "missing" and not (self.path / METRICS_FILE).is_file():
            state = "running or killed"
        else:
            state = STATES.get(self.status, self.status)
        return f"{state} (resumed {self.resumed}×)" if self.resumed else state


@dataclass
class Group:
    """Runs that share the values of the grouping keys."""

    values: tuple[str, ...]
    runs: list[Run]

    @property
    def completed(self) -> list[Run]:
        return [run for run in self.runs if run.ok]

    def stats(self, metric: str) -> tuple[float, float, int]:
        """Mean, sample std (ddof=1; NaN for one value) and count of ``metric``'s values."""
        values = np.array(
            [run.metrics[metric] for run in self.completed if metric in run.metrics], dtype=float
        )
        if len(values) == 0:
            return math.nan, math.nan, 0
        std = float(np.std(values, ddof=1)) if len(values) > 1 else math.nan
        return float(np.mean(values)), std, len(values)


# ----------------------------------------------------------------------------- reading


def parse_overrides(lines: Iterable[str]) -> dict[str, str]:
    """``["model.beta=4", "+x=1", "~callbacks.a"]`` -> ``{"model.beta": "4", "x": "1",
    "~callbacks.a": "<deleted>"}``."""
    overrides: dict[str, str] = {}
    for line in lines:
        key, sep, value = str(line).partition("=")
        if key.startswith("~"):
            overrides[key] = value if sep else "<deleted>"
        else:
            overrides[key.lstrip("+")] = value
    return overrides


def find_run_dirs(paths: Sequence[str | Path]) -> list[Path]:
    """Run dirs (those with ``.hydra/overrides.yaml``) at or below each path, in order."""
    runs: list[Path] = []
    for path in map(Path, paths):
        if not path.exists():
            raise FileNotFoundError(f"no such file or directory: {path}")
        if (path / ".hydra" / "overrides.yaml").is_file() and not is_ensemble_run(path):
            found = [path]
        else:
            found = [p.parent.parent for p in path.rglob(".hydra/overrides.yaml")]
        runs += sorted((p for p in found if not is_ensemble_run(p)), key=_natural_key)
    unique = list(dict.fromkeys(p.resolve() for p in runs))
    return unique


def is_ensemble_run(path: Path) -> bool:
    """An ensemble run dir (``train.py ensemble.seeds=...``) is not a run itself; its members
    (``members/seed_<s>/``, each the single run ``seed=<s>``) are."""
    return any((path / "members").glob("*/.hydra/overrides.yaml"))


def _natural_key(path: Path) -> list[Any]:
    """Sort ``2`` before ``10``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(path))]


def read_run(path: Path) -> Run:
    """Read one run dir; a missing or unreadable ``metrics.json`` gives status ``missing``.

    An eval run takes the overrides of the training run whose checkpoint it evaluated (plus its
    own, minus where-keys such as ``ckpt_path``), so that its seeds group together."""
    run = _read_record(path)
    _adopt_training_overrides(run)
    try:
        history = json.loads((path / RESUME_FILE).read_text())
        run.resumed = int(history.get("resumed", 0))
    except (OSError, ValueError, TypeError, AttributeError):
        pass
    return run


def _training_run_of(ckpt_path: str) -> Path | None:
    """The run dir that wrote ``<run>/checkpoints/<name>.ckpt``, if it is one."""
    run = Path(ckpt_path).parent.parent
    return run if (run / ".hydra" / "overrides.yaml").is_file() else None


def evaluated_label(ckpt: str | Path) -> str:
    """An eval row's extra grouping value, keeping it apart from its training run's row:
    ``last`` (the final weights) or ``best`` (any other checkpoint: a selected one)."""
    return "last" if Path(ckpt).name == "last.ckpt" else "best"


def is_eval_run(run: Run) -> bool:
    """An eval.py run: its saved config says so, or (no config) its record names a checkpoint."""
    if run.config is not None:
        return run.config.get("task_name") == "eval"
    return "ckpt_path" in (run.record or {})


def _adopt_training_overrides(run: Run) -> None:
    # the record's path is resolved; the override may carry Hydra quotes ('...')
    ckpt = (run.record or {}).get("ckpt_path") or run.overrides.get("ckpt_path", "").strip("'\"")
    if not ckpt or not is_eval_run(run):
        return
    run.evaluates = str(ckpt)
    train_dir = _training_run_of(ckpt)
    if train_dir is None:
        return
    trained = parse_overrides(
        yaml.safe_load((train_dir / ".hydra" / "overrides.yaml").read_text()) or []
    )
    own = {k: v for k, v in run.overrides.items() if not _matches(k, EVAL_IGNORED)}
    run.overrides = {**trained, **own, "evaluated": evaluated_label(ckpt)}
    config_file = train_dir / ".hydra" / "config.yaml"  # defaults of the grouping keys
    run.config = yaml.safe_load(config_file.read_text()) if config_file.is_file() else None


def _read_record(path: Path) -> Run:
    overrides = parse_overrides(
        yaml.safe_load((path / ".hydra" / "overrides.yaml").read_text()) or []
    )
    config_file = path / ".hydra" / "config.yaml"
    config = yaml.safe_load(config_file.read_text()) if config_file.is_file() else None
    metrics_file = path / METRICS_FILE
    if not metrics_file.is_file():
        return Run(
            path,
            overrides,
            "missing",
            error="no metrics.json (still running, or killed, or written by an older latentzoo)",
            config=config,
        )
    try:
        record = json.loads(metrics_file.read_text())
    except (OSError, ValueError) as error:
        return Run(path, overrides, "missing", error=f"unreadable metrics.json: {error}")
    metrics = {
        key: float(value)
        for key, value in (record.get("metrics") or {}).items()
        if isinstance(value, int | float) and not isinstance(value, bool)
    }
    status = record.get("status", "completed")  # eval's metrics.json has no status
    error = record.get("error")
    if status == "completed" and not metrics:
        status, error = "missing", "metrics.json has no metrics"
    run = Run(path, overrides, status, metrics, error, record.get("global_step"), config)
    run.record = record
    return run


# ----------------------------------------------------------------------------- grouping


def _config_value(config: dict[str, Any] | None, key: str) -> str | None:
    """The value of dotted ``key`` in a run's saved config, as overrides spell values."""
    node: Any = config
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    if isinstance(node, dict | list):
        return None
    return "null" if node is None else str(node).lower() if isinstance(node, bool) else str(node)


def _matches(name: str, patterns: Sequence[str]) -> bool:
    """Glob (``val/*``) or full-match regex (``test/(loss|kl)``)."""
    for pattern in patterns:
        if fnmatch.fnmatchcase(name, pattern):
            return True
        try:
            if re.fullmatch(pattern, name):
                return True
        except re.error:
            pass
    return False


def value_of(run: Run, key: str) -> str:
    """A run's value for ``key``: its override, else its saved config's value, else "—"."""
    if key in run.overrides:
        return run.overrides[key]
    return _config_value(run.config, key) or MISSING


def grouping_keys(runs: Sequence[Run], ignore: Sequence[str] = ()) -> list[str]:
    """Override keys whose value differs between runs, minus ``seed`` and ``ignore``."""
    keys = list(dict.fromkeys(key for run in runs for key in run.overrides))
    skip = [*ALWAYS_IGNORED, *ignore]
    return [
        key
        for key in keys
        if not _matches(key, skip) and len({value_of(run, key) for run in runs}) > 1
    ]


def _sort_value(value: str) -> tuple[int, Any]:
    try:
        return (0, float(value))
    except ValueError:
        return (1, value)


def group_runs(runs: Sequence[Run], keys: Sequence[str]) -> list[Group]:
    groups: dict[tuple[str, ...], list[Run]] = {}
    for run in runs:
        groups.setdefault(tuple(value_of(run, key) for key in keys), []).append(run)
    order = sorted(groups, key=lambda values: [_sort_value(v) for v in values])
    return [Group(values, groups[values]) for values in order]


def select_metrics(runs: Sequence[Run], patterns: Sequence[str] | None) -> list[str]:
    names = sorted({name for run in runs if run.ok for name in run.metrics})
    return [name for name in names if not patterns or _matches(name, patterns)]


# ----------------------------------------------------------------------------- writing


def format_stat(mean: float, std: float, n: int, group_n: int) -> str:
    if n == 0:
        return MISSING
    if std < 1e-9 * abs(mean):  # equal values: float noise, not spread
        std = 0.0
    text = f"{mean:.4g} ± {std:.2g}" if not math.isnan(std) else f"{mean:.4g}"
    return text if n == group_n else f"{text} (n={n})"


@dataclass
class Summary:
    keys: list[str]
    metrics: list[str]
    groups: list[Group]
    runs: list[Run]

    @property
    def problems(self) -> list[Run]:
        return [run for run in self.runs if not run.ok]

    def table_rows(self) -> list[list[str]]:
        rows = []
        for group in self.groups:
            n = len(group.completed)
            row = [*(group.values or ("all",)), str(n), str(len(group.runs) - n)]
            row += [format_stat(*group.stats(m), n) for m in self.metrics]
            rows.append(row)
        return rows

    @property
    def header(self) -> list[str]:
        return [*(self.keys or ["runs"]), "n", "failed", *self.metrics]

    def write_csv(self, path: Path) -> None:
        with path.open("w", newline="") as file:
            writer = csv.writer(file)
            stats = [f"{m}_{s}" for m in self.metrics for s in ("mean", "std", "n")]
            writer.writerow([*(self.keys or ["runs"]), "n", "failed", *stats])
            for group in self.groups:
                n = len(group.completed)
                row: list[Any] = [*(group.values or ("all",)), n, len(group.runs) - n]
                for metric in self.metrics:
                    row += list(group.stats(metric))
                writer.writerow(row)

    def write_json(self, path: Path) -> None:
        """Per group: its key values, n, failed and {metric: {mean, std, n}} (NaN -> null)."""

        def number(x: float) -> float | None:
            return None if math.isnan(x) else x

        groups = []
        for group in self.groups:
            stats = {}
            for metric in self.metrics:
                mean, std, n = group.stats(metric)
                stats[metric] = {"mean": number(mean), "std": number(std), "n": n}
            n = len(group.completed)
            values = dict(zip(self.keys, group.values, strict=True))
            groups.append({"values": values, "n": n, "failed": len(group.runs) - n, **stats})
        path.write_text(json.dumps({"keys": self.keys, "groups": groups}, indent=2))

    def clg_columns(self) -> list[tuple[str, str | None]]:
        """(header, metric name or None) of the CLG-VAE paper's columns: the shortest logged
        name ending in the column's score key (the canonical preset before ``clg/...``)."""
        names = select_metrics(self.runs, None)
        columns = []
        for header, keys in CLG_COLUMNS:
            found = None
            for key in keys:
                matches = [n for n in names if n == key or n.endswith("/" + key)]
                if matches:
                    found = min(matches, key=len)
                    break
            columns.append((header, found))
        return columns

    def clg_rows(self) -> tuple[list[str], list[list[str]]]:
        """The CLG-VAE layout: mean (std) over seeds in percent with one decimal."""
        columns = self.clg_columns()
        header = [*(self.keys or ["runs"]), "n", *(h for h, _ in columns)]
        rows = []
        for group in self.groups:
            n = len(group.completed)
            row = [*(group.values or ("all",)), str(n)]
            for _, metric in columns:
                mean, std, count = group.stats(metric) if metric else (math.nan, math.nan, 0)
                if count == 0:
                    row.append(MISSING)
                else:
                    spread = "" if math.isnan(std) else f" ({100 * std:.1f})"
                    row.append(f"{100 * mean:.1f}{spread}")
            rows.append(row)
        return header, rows

    def clg_markdown(self, root: Path) -> str:
        header, rows = self.clg_rows()
        used = [f"{h} = {m}" for h, m in self.clg_columns() if m]
        lines = [
            f"# CLG-VAE layout: {root}",
            "",
            "Mean (sample std, ddof=1) over seeds, in %. Columns: " + "; ".join(used) + ".",
            "",
            "| " + " | ".join(_md(h) for h in header) + " |",
            "|" + "|".join("---" for _ in header) + "|",
        ]
        lines += ["| " + " | ".join(_md(cell) for cell in row) + " |" for row in rows]
        return "\n".join(lines) + "\n"

    def write_runs_csv(self, path: Path, root: Path) -> None:
        override_keys = list(dict.fromkeys(k for run in self.runs for k in run.overrides))
        with path.open("w", newline="") as file:
            writer = csv.writer(file)
            writer.writerow(
                ["run", "status", "state", "global_step", *override_keys, *self.metrics, "error"]
            )
            for run in self.runs:
                writer.writerow(
                    [
                        _relative(run.path, root),
                        run.status,
                        run.state,
                        run.global_step,
                        *(run.overrides.get(k, "") for k in override_keys),
                        *(run.metrics.get(m, "") for m in self.metrics),
                        run.error or "",
                    ]
                )

    def markdown(self, root: Path) -> str:
        header = self.header
        lines = [
            f"# Sweep summary: {root}",
            "",
            "Mean ± sample std (ddof=1) over seeds; n = completed runs per configuration "
            "(a cell's own (n=k) when fewer runs logged that metric).",
            "",
            "| " + " | ".join(_md(h) for h in header) + " |",
            "|" + "|".join("---" for _ in header) + "|",
        ]
        lines += ["| " + " | ".join(_md(cell) for cell in row) + " |" for row in self.table_rows()]
        if self.problems:
            lines += [
                "",
                "## Failed or incomplete runs",
                "",
                "| run | state | overrides | error |",
            ]
            lines += ["|---|---|---|---|"]
            for run in self.problems:
                overrides = " ".join(f"{k}={v}" for k, v in run.overrides.items())
                lines.append(
                    f"| {_md(_relative(run.path, root))} | {run.state} | {_md(overrides)} "
                    f"| {_md(run.error or '')} |"
                )
        return "\n".join(lines) + "\n"

    def print(self, root: Path) -> None:
        from rich.console import Console
        from rich.table import Table

        console = Console()
        title = f"{root}: mean ± std (ddof=1) over seeds"
        rows, header = self.table_rows(), self.header
        if len(self.metrics) > 6:  # many metrics: one row per metric reads better on a terminal
            nkeys = len(header) - len(self.metrics)
            table = Table(title=title)
            table.add_column("metric", style="cyan")
            for row in rows:
                label = ", ".join(f"{k}={v}" for k, v in zip(self.keys, row, strict=False))
                table.add_column(f"{label or 'all'}\n(n={row[nkeys - 2]})", justify="right")
            for i, metric in enumerate(self.metrics):
                table.add_row(metric, *(row[nkeys + i] for row in rows))
        else:
            table = Table(title=title)
            for i, name in enumerate(header):
                table.add_column(
                    name,
                    style="cyan" if i < len(header) - len(self.metrics) else None,
                    justify="left" if i < len(header) - len(self.metrics) else "right",
                )
            for row in rows:
                table.add_row(*row)
        console.print(table)
        if self.problems:
            failed = Table(title="Failed or incomplete runs", style="red")
            for name in ("run", "state", "overrides", "error"):
                failed.add_column(name)
            for run in self.problems:
                overrides = " ".join(f"{k}={v}" for k, v in run.overrides.items())
                failed.add_row(_relative(run.path, root), run.state, overrides, run.error or "")
            console.print(failed)
        console.print(self.runs_table(root))

    def runs_table(self, root: Path, max_metrics: int = 4) -> Any:
        """One row per run: its state and step next to its values of the grouping keys and of
        the first ``max_metrics`` metrics."""
        from rich.table import Table

        metrics = self.metrics[:max_metrics]
        table = Table(title="Runs")
        for name in ("run", "state", "step", *self.keys, *metrics):
            table.add_column(name, justify="right" if name in metrics else "left")
        for run in self.runs:
            step = "" if run.global_step is None else str(run.global_step)
            values = [value_of(run, key) for key in self.keys]
            scores = [f"{run.metrics[m]:.4g}" if m in run.metrics else MISSING for m in metrics]
            table.add_row(_relative(run.path, root), run.state, step, *values, *scores)
        return table


def _md(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root.resolve())) or "."
    except ValueError:
        return str(path)


# ----------------------------------------------------------------------------- evaluation

EvalRunner = Callable[[Path, Sequence[str], Path], tuple[bool, str]]


def eval_tag(ckpt: str, overrides: Sequence[str]) -> str:
    """The eval run dir's name under ``<run>/eval/``: the checkpoint choice and the overrides."""
    text = "-".join([ckpt, *overrides]).replace("=", "-")
    return re.sub(r"[^A-Za-z0-9_.,+-]+", "_", text)[:150]


def checkpoint_of(run: Run, which: str) -> Path | None:
    """``last``: ``<run>/checkpoints/last.ckpt`` (the final weights: train rewrites it at the
    last step); ``best``: the run's best-by-validation checkpoint. None when absent."""
    if which == "last":
        path: Path | None = run.path / "checkpoints" / "last.ckpt"
    elif which == "best":
        best = (run.record or {}).get("best_model_path")
        path = Path(best) if best else None
    else:
        raise ValueError(f"--ckpt must be last or best, got {which!r}")
    return path if path is not None and path.is_file() else None


def run_eval(ckpt: Path, overrides: Sequence[str], out_dir: Path) -> tuple[bool, str]:
    """``python -m latentzoo.eval ckpt_path=<ckpt> <overrides>`` into ``out_dir``, in a child
    process (a fresh Hydra); (succeeded, the tail of its output)."""
    command = [
        sys.executable,
        "-m",
        "latentzoo.eval",
        f"ckpt_path='{ckpt}'",
        *overrides,
        f"hydra.run.dir='{out_dir}'",
    ]
    done = subprocess.run(command, capture_output=True, text=True)
    return done.returncode == 0, (done.stderr or done.stdout)[-3000:]


def _evaluated(eval_dir: Path, ckpt: Path) -> bool:
    """Whether ``eval_dir`` holds a finished eval of ``ckpt`` (collect --eval resumes)."""
    try:
        record = json.loads((eval_dir / METRICS_FILE).read_text())
    except (OSError, ValueError):
        return False
    same = Path(str(record.get("ckpt_path", ""))).resolve() == ckpt.resolve()
    return same and record.get("status", "completed") == "completed" and bool(record.get("metrics"))


def evaluate_runs(
    paths: Sequence[str | Path],
    overrides: Sequence[str],
    ckpt: str = "last",
    runner: EvalRunner = run_eval,
    show: bool = True,
) -> list[Run]:
    """Evaluate the chosen checkpoint of every finished training run below ``paths`` with
    eval.py ``overrides`` (skipping those evaluated before) and return the eval runs, carrying
    their training runs' overrides; unfinished or failed ones are returned as problems."""
    run_dirs = find_run_dirs(paths)
    train_runs = [run for run in map(read_run, run_dirs) if run.evaluates is None]
    if not train_runs:
        raise FileNotFoundError(f"no training runs under {', '.join(map(str, paths))}")
    tag = eval_tag(ckpt, overrides)
    own = {k: v for k, v in parse_overrides(overrides).items() if not _matches(k, EVAL_IGNORED)}
    results: list[Run] = []
    for position, run in enumerate(train_runs, start=1):
        eval_dir = run.path / EVAL_DIR / tag
        checkpoint = checkpoint_of(run, ckpt) if run.status == "completed" else None
        label = f"[{position}/{len(train_runs)}] {run.path.name}"
        if checkpoint is None:
            why = run.state if run.status != "completed" else f"no {ckpt} checkpoint"
            if show:
                print(f"{label}: not evaluated ({why})", flush=True)
            error = f"not evaluated: training {why}" if run.status != "completed" else why
            keys = {**run.overrides, **own, "evaluated": ckpt}
            results.append(Run(run.path, keys, "failed", error=error, config=run.config))
            continue
        if not _evaluated(eval_dir, checkpoint):
            if show:
                print(f"{label}: evaluating {checkpoint.name} ...", flush=True)
            started = time.perf_counter()
            ok, output = runner(checkpoint, overrides, eval_dir)
            if show:
                outcome = "done" if ok else "FAILED"
                print(f"{label}: {outcome} in {time.perf_counter() - started:.0f} s", flush=True)
            if not ok:
                error = f"eval failed: {output.strip().splitlines()[-1] if output.strip() else ''}"
                keys = {**run.overrides, **own, "evaluated": ckpt}
                results.append(Run(eval_dir, keys, "failed", error=error, config=run.config))
                continue
        elif show:
            print(f"{label}: evaluated before, skipped", flush=True)
        results.append(read_run(eval_dir))  # with the training run's overrides
    return results


# ----------------------------------------------------------------------------- entry points


def summarize_runs(
    runs: Sequence[Run], metrics: Sequence[str] | None = None, ignore: Sequence[str] = ()
) -> Summary:
    """Group ``runs`` by the overrides that vary between them, except seed and ``ignore``."""
    keys = grouping_keys(runs, ignore)
    return Summary(keys, select_metrics(runs, metrics), group_runs(runs, keys), list(runs))


def summarize(
    paths: Sequence[str | Path],
    metrics: Sequence[str] | None = None,
    ignore: Sequence[str] = (),
) -> Summary:
    """Read every run below ``paths`` and group them; see the module docstring."""
    run_dirs = find_run_dirs(paths)
    if not run_dirs:
        raise FileNotFoundError(
            f"no run dirs (with .hydra/overrides.yaml) under {', '.join(map(str, paths))}"
        )
    return summarize_runs([read_run(path) for path in run_dirs], metrics, ignore)


def default_root(paths: Sequence[str | Path]) -> Path:
    """The directory the outputs go to by default: the common parent of ``paths``."""
    return Path(os.path.commonpath([Path(p).resolve() for p in paths]))


FORMATS = ("table", "clg")


def collect(
    paths: Sequence[str | Path],
    metrics: Sequence[str] | None = None,
    ignore: Sequence[str] = (),
    out: str | Path | None = None,
    show: bool = True,
    eval_overrides: Sequence[str] | None = None,
    ckpt: str = "last",
    fmt: str = "table",
    runner: EvalRunner = run_eval,
    plot: bool = False,
    plot_x: str | None = None,
) -> Summary:
    """Summarise (after evaluating, with ``eval_overrides``), write ``<out>.csv``, ``.json``,
    ``.md`` and ``<out>_runs.csv`` (``fmt="clg"``: also ``<out>_clg.md``; ``plot``: PNGs in
    ``<out>_plots/``, see :mod:`latentzoo.collect_plots`), print the table."""
    if fmt not in FORMATS:
        raise LookupError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if eval_overrides is not None:
        runs = evaluate_runs(paths, eval_overrides, ckpt, runner, show)
        summary = summarize_runs(runs, metrics, ignore)
    else:
        summary = summarize(paths, metrics, ignore)
    if metrics and not summary.metrics:
        available = ", ".join(select_metrics(summary.runs, None)) or "none"
        raise LookupError(f"no metric matches {' '.join(metrics)}; available: {available}")
    root = default_root(paths)
    default = "collect" if eval_overrides is None else f"collect_{eval_tag(ckpt, eval_overrides)}"
    prefix = Path(out) if out else (root if root.is_dir() else root.parent) / default
    prefix.parent.mkdir(parents=True, exist_ok=True)
    written = [prefix.with_name(prefix.name + suffix) for suffix in (".csv", ".json", ".md")]
    summary.write_csv(written[0])
    summary.write_json(written[1])
    written[2].write_text(summary.markdown(root))
    summary.write_runs_csv(prefix.with_name(prefix.name + "_runs.csv"), root)
    if fmt == "clg":
        written.append(prefix.with_name(prefix.name + "_clg.md"))
        written[-1].write_text(summary.clg_markdown(root))
    plots: list[Path] = []
    if plot:
        from latentzoo.collect_plots import write_plots

        plots = write_plots(summary, prefix.with_name(prefix.name + "_plots"), plot_x, metrics)
    if show:
        summary.print(root)
        if fmt == "clg":
            print(summary.clg_markdown(root))
        print(f"wrote {', '.join(str(p) for p in written)}, {prefix}_runs.csv")
        if plot:
            print(f"plots ({len(plots)}) in {prefix}_plots/:")
            for path in plots:
                print(f"  {path.relative_to(prefix.parent)}")
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m latentzoo.collect",
        description="Mean ± std (ddof=1) of final metrics per configuration of a sweep.",
    )
    parser.add_argument(
        "paths", nargs="+", help="a multirun dir, run dirs, or any tree containing run dirs"
    )
    parser.add_argument(
        "--metrics",
        nargs="+",
        metavar="PATTERN",
        help="metrics to report: globs (val/*) or regexes (test/(loss|kl)); default: all",
    )
    parser.add_argument(
        "--ignore",
        nargs="+",
        default=[],
        metavar="KEY",
        help="override keys (or globs) not to group by, besides seed (e.g. paths.log_dir)",
    )
    parser.add_argument(
        "--out",
        help="output prefix: writes <out>.csv, <out>.json, <out>.md, <out>_runs.csv "
        "(default: <sweep dir>/collect, or collect_<eval tag> with --eval)",
    )
    parser.add_argument(
        "--eval",
        nargs="+",
        metavar="OVERRIDE",
        help="first evaluate each finished run's checkpoint with eval.py and these overrides "
        "(e.g. metrics=disentanglement: the canonical preset), skipping runs evaluated "
        "before, and tabulate the eval numbers",
    )
    parser.add_argument(
        "--ckpt",
        default="last",
        choices=("last", "best"),
        help="with --eval: the final weights (last.ckpt, default, as disentanglement_lib) or "
        "the best-by-validation checkpoint",
    )
    parser.add_argument(
        "--format",
        default="table",
        choices=FORMATS,
        help="clg: also the CLG-VAE paper's table (percent, its column order) in <out>_clg.md",
    )
    parser.add_argument(
        "--plot",
        action="store_true",
        help="also write PNGs to <out>_plots/: each metric vs the swept hyper-parameter (mean ± "
        "std over seeds) and training curves from the CSV logs (mean ± std band per group)",
    )
    parser.add_argument(
        "--plot-x",
        metavar="KEY",
        help="the swept key on the x axis (default: the one with most numeric values)",
    )
    args = parser.parse_args(argv)
    try:
        summary = collect(
            args.paths,
            args.metrics,
            args.ignore,
            args.out,
            eval_overrides=args.eval,
            ckpt=args.ckpt,
            fmt=args.format,
            plot=args.plot,
            plot_x=args.plot_x,
        )
    except (FileNotFoundError, LookupError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if not any(run.ok for run in summary.runs):
        print("error: no run finished with metrics", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
