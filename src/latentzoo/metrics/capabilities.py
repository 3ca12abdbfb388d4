"""Metrics ask models for capabilities (``encode``, ``sample``, ``log_prob``, ...) by name.

A model may say why it lacks one in a class attribute ``capability_notes = {name: reason}``."""

from __future__ import annotations

from collections.abc import Iterable

from latentzoo.utils.errors import MissingCapabilityError


def require_capabilities(model: object, capabilities: Iterable[str], metric: str) -> None:
    """Raise a clear error if ``model`` lacks a method that ``metric`` needs."""
    missing = [name for name in capabilities if not callable(getattr(model, name, None))]
    if missing:
        notes = getattr(model, "capability_notes", {})
        why = "".join(f" {name}(): {notes[name]}." for name in missing if name in notes)
        raise MissingCapabilityError(
            f"metric '{metric}' needs the model to implement {', '.join(missing)}(), which "
            f"{type(model).__name__} does not.{why} Choose other metrics for this checkpoint."
        )
