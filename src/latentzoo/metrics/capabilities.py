"""Metrics ask models for capabilities (``encode``, ``sample``, ``log_prob``, ...) by name."""

from __future__ import annotations

from collections.abc import Iterable

from latentzoo.utils.errors import MissingCapabilityError


def require_capabilities(model: object, capabilities: Iterable[str], metric: str) -> None:
    """Raise a clear error if ``model`` lacks a method that ``metric`` needs."""
    missing = [name for name in capabilities if not callable(getattr(model, name, None))]
    if missing:
        raise MissingCapabilityError(
            f"metric '{metric}' needs the model to implement {', '.join(missing)}(), which "
            f"{type(model).__name__} does not. Choose other metrics for this checkpoint."
        )
