"""Pretty-print the composed config as a rich tree and save it next to the run."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import rich
import rich.syntax
import rich.table
import rich.tree
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from latentzoo.utils.logging import RankedLogger

log = RankedLogger(__name__)

DEFAULT_ORDER = ("data", "model", "callbacks", "logger", "trainer", "paths", "extras")


@rank_zero_only
def print_config_tree(
    cfg: DictConfig,
    print_order: Sequence[str] = DEFAULT_ORDER,
    resolve: bool = False,
    save_to_file: bool = False,
) -> None:
    """Print the config groups in ``print_order`` first, then the rest; optionally save to
    ``<output_dir>/config_tree.log``."""
    tree = rich.tree.Tree("CONFIG", style="dim", guide_style="dim")
    queue = [field for field in print_order if field in cfg]
    queue += [field for field in cfg if field not in queue]
    for field in queue:
        branch = tree.add(field, style="dim", guide_style="dim")
        group = cfg[field]
        text = (
            OmegaConf.to_yaml(group, resolve=resolve)
            if isinstance(group, DictConfig)
            else str(group)
        )
        branch.add(rich.syntax.Syntax(text, "yaml"))
    rich.print(tree)
    if save_to_file:
        with open(Path(cfg.paths.output_dir, "config_tree.log"), "w") as file:
            rich.print(tree, file=file)


@rank_zero_only
def print_metrics_table(metrics: Mapping[str, float], title: str = "metrics") -> None:
    """Print a two-column table of metric name and value."""
    table = rich.table.Table(title=title)
    table.add_column("metric", style="cyan")
    table.add_column("value", justify="right")
    for name in sorted(metrics):
        value = metrics[name]
        table.add_row(name, f"{value:.6g}" if isinstance(value, float) else str(value))
    rich.print(table)
