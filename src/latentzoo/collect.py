"""Summarise a sweep: mean ± std of each run's final metrics per configuration.

    python train.py -m experiment=beta_vae_proc_dsprites seed=0,1,2,3,4
    python -m latentzoo.collect logs/train/multiruns/<time>

Each run dir (one with ``.hydra/overrides.yaml``) contributes its ``metrics.json`` (written by
the train task at the end of a run, or with status ``failed`` when it crashed). Runs are grouped
by the overrides that vary across runs, except ``seed`` and ``--ignore`` keys; per group the
mean and sample standard deviation (ddof=1) of every selected metric are written to
``<out>.csv`` and ``<out>.md`` (default ``<out>`` = ``<sweep>/collect``), one row per run to
``<out>_runs.csv``, and the table is printed. Failed or unfinished runs are listed, not dropped.

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
import sys
from collections.abc import Iterable, Sequence
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
        if (path / ".hydra" / "overrides.yaml").is_file():
            found = [path]
        else:
            found = [p.parent.parent for p in path.rglob(".hydra/overrides.yaml")]
        runs += sorted(found, key=_natural_key)
    unique = list(dict.fromkeys(p.resolve() for p in runs))
    return unique


def _natural_key(path: Path) -> list[Any]:
    """Sort ``2`` before ``10``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(path))]


def read_run(path: Path) -> Run:
    """Read one run dir; a missing or unreadable ``metrics.json`` gives status ``missing``."""
    run = _read_record(path)
    try:
        history = json.loads((path / RESUME_FILE).read_text())
        run.resumed = int(history.get("resumed", 0))
    except (OSError, ValueError, TypeError, AttributeError):
        pass
    return run


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
    return Run(path, overrides, status, metrics, error, record.get("global_step"), config)


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


# ----------------------------------------------------------------------------- entry points


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
    runs = [read_run(path) for path in run_dirs]
    keys = grouping_keys(runs, ignore)
    return Summary(keys, select_metrics(runs, metrics), group_runs(runs, keys), runs)


def default_root(paths: Sequence[str | Path]) -> Path:
    """The directory the outputs go to by default: the common parent of ``paths``."""
    return Path(os.path.commonpath([Path(p).resolve() for p in paths]))


def collect(
    paths: Sequence[str | Path],
    metrics: Sequence[str] | None = None,
    ignore: Sequence[str] = (),
    out: str | Path | None = None,
    show: bool = True,
) -> Summary:
    """Summarise, write ``<out>.csv``, ``<out>.md`` and ``<out>_runs.csv``, print the table."""
    summary = summarize(paths, metrics, ignore)
    if metrics and not summary.metrics:
        available = ", ".join(select_metrics(summary.runs, None)) or "none"
        raise LookupError(f"no metric matches {' '.join(metrics)}; available: {available}")
    root = default_root(paths)
    prefix = Path(out) if out else (root if root.is_dir() else root.parent) / "collect"
    prefix.parent.mkdir(parents=True, exist_ok=True)
    summary.write_csv(prefix.with_name(prefix.name + ".csv"))
    summary.write_runs_csv(prefix.with_name(prefix.name + "_runs.csv"), root)
    prefix.with_name(prefix.name + ".md").write_text(summary.markdown(root))
    if show:
        summary.print(root)
        print(f"wrote {prefix}.csv, {prefix}.md, {prefix}_runs.csv")
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
        help="output prefix: writes <out>.csv, <out>.md, <out>_runs.csv "
        "(default: <sweep dir>/collect)",
    )
    args = parser.parse_args(argv)
    try:
        summary = collect(args.paths, args.metrics, args.ignore, args.out)
    except (FileNotFoundError, LookupError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if not any(run.ok for run in summary.runs):
        print("error: no run finished with metrics", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
