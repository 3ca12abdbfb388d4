"""Metrics ask models for capabilities (``encode``, ``sample``, ``log_prob``, ...) by name.

A model may say why it lacks one in a class attribute ``capability_notes = {name: reason}``.
:func:`check_metric_set` also checks what a metric set needs from the data and the machine, so
eval.py refuses before its test loop."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from latentzoo.utils.errors import MissingCapabilityError


def require_capabilities(model: object, capabilities: Iterable[str], metric: str) -> None:
    """Raise a clear error if ``model`` lacks a method that ``metric`` needs."""
    missing = [name for name in capabilities if not callable(getattr(model, name, None))]
    if missing:
        notes = getattr(model, "capability_notes", {})
        why = "; ".join(f"{name}(): {notes[name]}" for name in missing if name in notes)
        raise MissingCapabilityError(
            f"metric '{metric}' needs the model to implement {', '.join(missing)}(), which "
            f"{type(model).__name__} does not{f' ({why})' if why else ''}; choose other metrics "
            "for this checkpoint"
        )


def _needs_factor_data(evaluator: Any, datamodule: Any) -> None:
    from latentzoo.metrics.ground_truth import factor_dataset_of

    factor_dataset_of(datamodule)  # raises: names the datamodule and datasets that have factors


def _needs_feature_extractor(evaluator: Any, datamodule: Any) -> None:
    from latentzoo.metrics.generative.extractors import build_feature_extractor

    settings = getattr(evaluator, "metric_kwargs", {})
    build_feature_extractor(settings.get("extractor", "inception"), settings.get("weights_path"))


# evaluator class (module.qualname) -> what it needs from the data or the machine, checked
# before the test loop. An evaluator may instead define ``check(model, datamodule)``.
DATA_CHECKS: dict[str, Callable[[Any, Any], None]] = {
    "latentzoo.metrics.ground_truth.DisentanglementMetrics": _needs_factor_data,
    "latentzoo.metrics.generative.evaluators.FIDEvaluator": _needs_feature_extractor,
}


def check_metric_set(evaluator: Any, model: object, datamodule: Any, name: str) -> None:
    """Everything a metric set needs, before eval.py spends time on the test loop: the model's
    capabilities, then the data (factors) and files (Inception weights) it reads."""
    require_capabilities(model, getattr(evaluator, "requires", ()), name)
    for cls in type(evaluator).__mro__:
        check = DATA_CHECKS.get(f"{cls.__module__}.{cls.__qualname__}")
        if check is not None:
            check(evaluator, datamodule)
    own_check = getattr(evaluator, "check", None)
    if callable(own_check):
        own_check(model, datamodule)
