"""Process-group facts and a rank-0 progress bar, shared by the generative (and other) metrics."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch


def dist_info() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside an initialised process group."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


@contextlib.contextmanager
def progress_bar() -> Iterator[Any]:
    """A rich progress bar on rank 0; silent when another live display (e.g. Lightning's
    RichProgressBar during training) is already active, since rich allows only one."""
    from rich.errors import LiveError
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    progress = Progress(*columns, disable=dist_info()[0] != 0)
    try:
        progress.start()
    except LiveError:
        progress = Progress(*columns, disable=True)
    try:
        yield progress
    finally:
        progress.stop()
