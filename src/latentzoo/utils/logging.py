"""Rank-aware logging: messages from rank 0 only unless asked otherwise."""

from __future__ import annotations

import logging
from collections.abc import Mapping

from lightning.pytorch.utilities import rank_zero_only


class RankedLogger(logging.LoggerAdapter):
    """A logger that, in multi-process runs, logs on rank 0 only (or on a chosen rank).

    The rank is prefixed to each message so multi-GPU logs stay readable.
    """

    def __init__(
        self,
        name: str = __name__,
        rank_zero_only: bool = True,
        extra: Mapping[str, object] | None = None,
    ) -> None:
        super().__init__(logger=logging.getLogger(name), extra=extra)
        self.rank_zero_only = rank_zero_only

    def log(self, level: int, msg: str, *args, rank: int | None = None, **kwargs) -> None:
        if not self.isEnabledFor(level):
            return
        current_rank = getattr(rank_zero_only, "rank", 0) or 0
        msg, kwargs = self.process(msg, kwargs)
        msg = f"[rank: {current_rank}] {msg}"
        if self.rank_zero_only and current_rank != 0:
            return
        if rank is None or current_rank == rank:
            self.logger.log(level, msg, *args, **kwargs)
