"""Pictures of a sweep for ``python -m latentzoo.collect <sweep> --plot``.

- ``<metric>_vs_<key>.png``: each final metric against the swept hyper-parameter ``key``: mean
  ± sample std (ddof=1) over seeds as error bars, every seed as a faint dot, one line per
  combination of the other swept keys.
- ``curves/<metric>.png``: each metric of the runs' CSV logs (``csv/version_*/metrics.csv``)
  against the training step: the mean over a group's seeds as a line, ± one std as a band.

Figures are built by :func:`metric_figure` and :func:`curve_figure` (tests read their axes
back) and written by :func:`write_plots`; matplotlib's Agg backend, no display needed.
"""

from __future__ import annotations

import csv
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from latentzoo.collect import Group, Run, Summary

STEP = "step"
NOT_CURVES = ("epoch", "step")


def _figure() -> tuple[Figure, Any]:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.4, 4.4), layout="constrained")  # no pyplot: no GUI, no global state
    return figure, figure.add_subplot()


def _number(value: str) -> float | None:
    try:
        return float(value)
    except ValueError:
        return None


def choose_x(summary: Summary, x: str | None = None) -> str | None:
    """The swept key on the x axis: ``x`` if given, else the one with the most distinct
    numeric values (then any key); None when only seeds vary."""
    if x is not None:
        if x not in summary.keys:
            swept = ", ".join(summary.keys) or "none besides seed"
            raise LookupError(f"--plot-x {x} is not a swept key (swept: {swept})")
        return x
    if not summary.keys:
        return None

    def rank(index_key: tuple[int, str]) -> tuple[int, int, int]:
        index, key = index_key
        values = {group.values[index] for group in summary.groups}
        numeric = all(_number(v) is not None for v in values)
        return (numeric, len(values), -index)

    return max(enumerate(summary.keys), key=rank)[1]


def _label(keys: Sequence[str], values: Sequence[str]) -> str:
    return ", ".join(f"{k}={v}" for k, v in zip(keys, values, strict=True)) or "all runs"


def metric_figure(summary: Summary, metric: str, x: str) -> Figure:
    """``metric`` (final value per run) against swept key ``x``; see the module docstring."""
    index = summary.keys.index(x)
    others = [k for k in summary.keys if k != x]
    positions = sorted({g.values[index] for g in summary.groups}, key=_sort_key)
    numeric = all(_number(v) is not None for v in positions)
    where = {v: (_number(v) if numeric else float(i)) for i, v in enumerate(positions)}
    series: dict[tuple[str, ...], list[Group]] = {}
    for group in summary.groups:
        rest = tuple(v for i, v in enumerate(group.values) if i != index)
        series.setdefault(rest, []).append(group)
    figure, axes = _figure()
    for rest, groups in series.items():
        xs, means, stds, dots = [], [], [], ([], [])
        for group in groups:
            mean, std, n = group.stats(metric)
            if n == 0:
                continue
            xs.append(where[group.values[index]])
            means.append(mean)
            stds.append(0.0 if math.isnan(std) else std)
            for run in group.completed:
                if metric in run.metrics:
                    dots[0].append(where[group.values[index]])
                    dots[1].append(run.metrics[metric])
        if not xs:
            continue
        n_seeds = sorted({len(g.completed) for g in groups})
        label = _label(others, rest) if others else metric
        label += f" (n={'/'.join(map(str, n_seeds))} seeds)"
        bars = axes.errorbar(xs, means, yerr=stds, marker="o", capsize=4, label=label)
        axes.scatter(*dots, s=12, alpha=0.35, color=bars.lines[0].get_color())
    axes.set_xlabel(x)
    axes.set_ylabel(metric)
    if not numeric:
        axes.set_xticks([where[v] for v in positions], positions)
    elif len(positions) > 2 and _spans_decades(positions):
        axes.set_xscale("log")
    axes.set_title(f"{metric} vs {x}: mean ± std over seeds")
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    return figure


def _spans_decades(values: Sequence[str]) -> bool:
    numbers = [_number(v) for v in values]
    positive = [n for n in numbers if n is not None and n > 0]
    return len(positive) == len(numbers) and max(positive) / min(positive) >= 100


def _sort_key(value: str) -> tuple[int, Any]:
    number = _number(value)
    return (0, number) if number is not None else (1, value)


def read_curves(run_dir: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """metric -> (steps, values) from ``run_dir/csv/version_*/metrics.csv``; a resumed run's
    later versions win at the steps they repeat."""
    points: dict[str, dict[int, float]] = {}
    files = sorted(run_dir.glob("csv/version_*/metrics.csv"), key=_version)
    for file in files:
        with file.open(newline="") as handle:
            for row in csv.DictReader(handle):
                step = _number(row.get(STEP) or "")
                if step is None:
                    continue
                for name, cell in row.items():
                    value = _number(cell or "")
                    if name not in NOT_CURVES and value is not None and math.isfinite(value):
                        points.setdefault(name, {})[int(step)] = value
    return {
        name: (np.array(sorted(by_step)), np.array([by_step[s] for s in sorted(by_step)]))
        for name, by_step in points.items()
    }


def _version(path: Path) -> int:
    match = re.search(r"version_(\d+)", str(path))
    return int(match.group(1)) if match else 0


def training_dir(run: Run) -> Path:
    """Where a run's training logs are: its own dir, or for an eval run the run that wrote the
    checkpoint it evaluated (``<train run>/checkpoints/<name>.ckpt``)."""
    if run.evaluates:
        trained = Path(run.evaluates).parent.parent
        if (trained / "csv").is_dir():
            return trained
    return run.path


def group_curves(group: Group, metric: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Steps, mean and std (ddof=1 where ≥ 2 runs cover a step, else 0) of ``metric`` over the
    group's runs, each interpolated onto the union of logged steps within its own range."""
    curves = [read_curves(training_dir(run)).get(metric) for run in group.completed]
    curves = [c for c in curves if c is not None and len(c[0]) > 1]  # a curve, not a point
    if not curves:
        return np.array([]), np.array([]), np.array([]), 0
    steps = np.unique(np.concatenate([s for s, _ in curves]))
    stacked = np.full((len(curves), len(steps)), np.nan)
    for row, (s, v) in enumerate(curves):
        inside = (steps >= s[0]) & (steps <= s[-1])
        stacked[row, inside] = np.interp(steps[inside], s, v)
    counts = np.isfinite(stacked).sum(0)
    mean = np.nanmean(stacked, axis=0)
    std = np.zeros_like(mean)
    several = counts > 1
    std[several] = np.nanstd(stacked[:, several], axis=0, ddof=1)
    return steps, mean, std, len(curves)


def curve_figure(summary: Summary, metric: str) -> Figure | None:
    """``metric`` against the training step per group: mean line and ± std band."""
    figure, axes = _figure()
    drawn = False
    for group in summary.groups:
        steps, mean, std, n = group_curves(group, metric)
        if n == 0:
            continue
        label = f"{_label(summary.keys, group.values)} (n={n})"
        (line,) = axes.plot(steps, mean, label=label)
        axes.fill_between(steps, mean - std, mean + std, color=line.get_color(), alpha=0.25)
        drawn = True
    if not drawn:
        return None
    axes.set_xlabel("training step")
    axes.set_ylabel(metric)
    axes.set_title(f"{metric}: mean ± std over seeds")
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    return figure


def _file_name(metric: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", metric).strip("_")


def curve_metrics(summary: Summary, patterns: Sequence[str] | None) -> list[str]:
    """Metrics in any run's CSV log (matching ``patterns`` if given)."""
    from latentzoo.collect import _matches

    runs = [run for group in summary.groups for run in group.completed]
    names = {name for run in runs for name in read_curves(training_dir(run))}
    return sorted(n for n in names if not patterns or _matches(n, patterns))


def write_plots(
    summary: Summary,
    out_dir: Path,
    x: str | None = None,
    curve_patterns: Sequence[str] | None = None,
) -> list[Path]:
    """Write the PNGs (see the module docstring) into ``out_dir``; return their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    x = choose_x(summary, x)
    if x is not None:
        for metric in summary.metrics:
            if any(group.stats(metric)[2] for group in summary.groups):
                path = out_dir / f"{_file_name(metric)}_vs_{_file_name(x)}.png"
                metric_figure(summary, metric, x).savefig(path, dpi=120)
                written.append(path)
    for metric in curve_metrics(summary, curve_patterns):
        figure = curve_figure(summary, metric)
        if figure is not None:
            path = out_dir / "curves" / f"{_file_name(metric)}.png"
            path.parent.mkdir(exist_ok=True)
            figure.savefig(path, dpi=120)
            written.append(path)
    return written
