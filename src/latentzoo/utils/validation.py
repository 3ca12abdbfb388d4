"""Config values checked when the config is composed, before any data is loaded or device used.

Every node with a ``_target_`` (model, data, trainer, loggers, callbacks, metric sets and their
nested nodes) is checked against

* the **types** of its class's ``__init__`` parameters (``batch_size: int`` refuses ``abc``;
  ``Literal[...]`` hints give the allowed names), and
* the **ranges and allowed names** in :data:`RULES`, keyed by ``_target_`` class; a class
  inherits the rules of its base classes (one ``LightningDataModule`` entry: every datamodule).

plus values left at ``???``, interpolations that cannot be resolved, optional packages that a
logger needs and the accelerator the trainer asks for. Each problem is one
:class:`LatentzooError` line: what is wrong; how to fix it.
"""

from __future__ import annotations

import functools
import inspect
import math
import types
import typing
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from importlib.util import find_spec
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from latentzoo.utils.compat import check_pair
from latentzoo.utils.errors import LatentzooError


@dataclass(frozen=True)
class Range:
    """``low <= value <= high`` (``<`` where open); applied to each element of a list value."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def holds(self, value: float) -> bool:
        if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        above = self.high is not None and (
            value >= self.high if self.high_open else value > self.high
        )
        return not above

    def __str__(self) -> str:
        parts = []
        if self.low is not None:
            parts.append(f"{'>' if self.low_open else '>='} {self.low:g}")
        if self.high is not None:
            parts.append(f"{'<' if self.high_open else '<='} {self.high:g}")
        return " and ".join(parts)


@dataclass(frozen=True)
class Choice:
    """One of the allowed names (what the class itself accepts; kept in sync by a test)."""

    names: tuple[str, ...]

    def holds(self, value: Any) -> bool:
        return value in self.names

    def __str__(self) -> str:
        return "one of " + ", ".join(self.names)


Rule = Range | Choice


def describe(rule: Rule) -> str:
    """``a number >= 1`` / ``one of a, b``: the rule as the message states it."""
    return f"a number {rule}" if isinstance(rule, Range) else str(rule)


POSITIVE = Range(low=0, low_open=True)
NON_NEGATIVE = Range(low=0)
AT_LEAST_1 = Range(low=1)
PROBABILITY = Range(low=0, high=1)
STEPS = Range(low=-1)  # Lightning's -1 = unlimited

# _target_ class (module.qualname where it is defined) -> {parameter: range}. Only parameters
# present in the config are checked; null passes (a parameter that may not be null has a type
# hint saying so).
RULES: dict[str, dict[str, Rule]] = {
    # every datamodule
    "lightning.pytorch.core.datamodule.LightningDataModule": {
        "batch_size": AT_LEAST_1,
        "global_batch_size": AT_LEAST_1,
        "num_workers": NON_NEGATIVE,
        "val_size": NON_NEGATIVE,
        "test_size": NON_NEGATIVE,
        "image_shape": AT_LEAST_1,
        "image_size": AT_LEAST_1,
        "num_classes": NON_NEGATIVE,
        "flip_p": PROBABILITY,
    },
    "latentzoo.data.datasets.proc_dsprites.ProcDSprites": {"size": Choice(("full", "small"))},
    "latentzoo.data.datasets.proc_shapes3d.ProcShapes3D": {"size": Choice(("full", "small"))},
    # every model: the names the zoo shares (latent sizes, loss weights, rates)
    "lightning.pytorch.core.module.LightningModule": {
        "latent_dim": AT_LEAST_1,
        "beta": NON_NEGATIVE,
        "lr": POSITIVE,
        "kl_weight": NON_NEGATIVE,
        "label_dropout": PROBABILITY,
        "sigma_min": NON_NEGATIVE,
        "ema_decay": PROBABILITY,
    },
    "latentzoo.models.beta_vae.BetaVAE": {"likelihood": Choice(("bernoulli", "gaussian"))},
    "latentzoo.models.beta_tcvae.BetaTCVAE": {
        "alpha": NON_NEGATIVE,
        "gamma": NON_NEGATIVE,
        "estimator": Choice(("mws", "mss")),
    },
    "latentzoo.models.factor_vae.FactorVAE": {
        "gamma": NON_NEGATIVE,
        "discriminator_batch": Choice(("same", "split")),
    },
    "latentzoo.models.soft_intro_vae.SoftIntroVAE": {
        "beta_rec": NON_NEGATIVE,
        "beta_kl": NON_NEGATIVE,
        "beta_neg": NON_NEGATIVE,
        "gamma_r": NON_NEGATIVE,
    },
    "latentzoo.models.dlp.DeepLatentParticles": {
        "n_kp": AT_LEAST_1,
        "patch_size": AT_LEAST_1,
        "learned_feature_dim": AT_LEAST_1,
        "sigma": POSITIVE,
    },
    # every torch optimizer (model.optimizer)
    "torch.optim.optimizer.Optimizer": {
        "lr": POSITIVE,
        "weight_decay": NON_NEGATIVE,
        "momentum": NON_NEGATIVE,
        "eps": NON_NEGATIVE,
        "betas": Range(low=0, high=1, high_open=True),
    },
    "lightning.pytorch.trainer.trainer.Trainer": {
        "max_steps": STEPS,
        "max_epochs": STEPS,
        "min_steps": NON_NEGATIVE,
        "val_check_interval": POSITIVE,
        "check_val_every_n_epoch": AT_LEAST_1,
        "limit_train_batches": NON_NEGATIVE,
        "limit_val_batches": NON_NEGATIVE,
        "limit_test_batches": NON_NEGATIVE,
        "log_every_n_steps": AT_LEAST_1,
        "accumulate_grad_batches": AT_LEAST_1,
        "gradient_clip_val": NON_NEGATIVE,
        "num_nodes": AT_LEAST_1,
    },
}

# logger class -> (module it imports, pip package)
LOGGER_PACKAGES = {
    "lightning.pytorch.loggers.wandb.WandbLogger": ("wandb", "wandb"),
    "lightning.pytorch.loggers.mlflow.MLFlowLogger": ("mlflow", "mlflow"),
    "lightning.pytorch.loggers.comet.CometLogger": ("comet_ml", "comet-ml"),
    "lightning.pytorch.loggers.neptune.NeptuneLogger": ("neptune", "neptune"),
    "lightning.pytorch.loggers.tensorboard.TensorBoardLogger": ("tensorboard", "tensorboard"),
}

SIMPLE_TYPES = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


GROUPS = ("data", "model", "trainer", "logger", "callbacks", "metrics")


def _target_class(target: Any) -> Any:
    """The class or function a ``_target_`` names; None if it cannot be imported (instantiate
    then reports it with its own message)."""
    from hydra._internal.utils import _locate

    if not isinstance(target, str):
        return None
    try:
        return _locate(target)
    except Exception:
        return None


def _class_key(cls: Any) -> str:
    return f"{getattr(cls, '__module__', '')}.{getattr(cls, '__qualname__', '')}"


def rules_of(cls: Any) -> dict[str, Rule]:
    """The rules of ``cls``: its own entry over those of its base classes."""
    rules: dict[str, Rule] = {}
    for base in reversed(getattr(cls, "__mro__", (cls,))):
        rules.update(RULES.get(_class_key(base), {}))
    return rules


@functools.cache
def parameter_hints(target: Any) -> dict[str, tuple[Any, Any]]:
    """``{parameter: (type hint, default)}`` of a class's ``__init__`` or of a function; empty
    if they cannot be read."""
    function = target.__init__ if isinstance(target, type) else target
    try:
        signature = inspect.signature(function)
        hints = typing.get_type_hints(function)
    except Exception:  # unresolvable annotations: the class is not type-checked
        return {}
    return {
        name: (hints.get(name, Any), parameter.default)
        for name, parameter in signature.parameters.items()
        if name != "self"
    }


def _type_problem(value: Any, hint: Any) -> str | None:
    """What ``value`` should be instead, or None if it fits ``hint`` (or ``hint`` is too rich
    to check: classes, callables, tensors and anything else pass)."""
    if hint is Any or value is None and _allows_none(hint):
        return None
    origin = typing.get_origin(hint)
    if origin is typing.Union or origin is types.UnionType:
        members = [m for m in typing.get_args(hint) if m is not type(None)]
        problems = [_type_problem(value, m) for m in members]
        if any(p is None for p in problems):
            return None
        return " or ".join(dict.fromkeys(problems))
    if origin is typing.Literal:
        allowed = typing.get_args(hint)
        return None if value in allowed else "one of " + ", ".join(map(str, allowed))
    if origin in (list, tuple, Sequence) or hint in (list, tuple):
        if not isinstance(value, ListConfig | list | tuple):
            return "a list"
        args = [a for a in typing.get_args(hint) if a is not Ellipsis]
        if len(set(args)) == 1:
            problems = [_type_problem(item, args[0]) for item in value]
            if any(problems):
                return f"a list of {next(p for p in problems if p)}"
        return None
    if hint is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        return None if ok else SIMPLE_TYPES[float]
    if hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        return None if ok else SIMPLE_TYPES[int]
    if hint in (str, bool):
        return None if isinstance(value, hint) else SIMPLE_TYPES[hint]
    return None


def _allows_none(hint: Any) -> bool:
    return type(None) in typing.get_args(hint) or hint is type(None)


def _target_nodes(node: DictConfig, path: str) -> Iterator[tuple[str, DictConfig]]:
    """``(full key, node)`` of ``node`` and every ``_target_`` node below it, parents first;
    a value left at ``???`` is refused on the way. Nothing is resolved here: values that
    interpolate Hydra's runtime (the run dir) are only known once the run starts."""
    if "_target_" in node:
        yield path, node
    for key in node:
        full_key = f"{path}.{key}"
        if OmegaConf.is_missing(node, key):
            _value(node, str(key), full_key)  # raises: names the key
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not child._is_none():
            yield from _target_nodes(child, full_key)


def _value(node: DictConfig, key: str, full_key: str) -> Any:
    """The resolved value, or an error naming the key and the interpolation that failed."""
    if OmegaConf.is_missing(node, key):
        raise LatentzooError(
            f"{full_key} is required but has no value (???); add {full_key}=<value> to the command"
        )
    try:
        return node[key]
    except OmegaConfBaseException as error:
        raw = node._get_node(key)._value() if node._get_node(key) is not None else "?"
        reason = str(error).splitlines()[0]
        raise LatentzooError(
            f"{full_key} = {raw} cannot be computed ({reason}); fix the value it refers to"
        ) from None


def _show(value: Any) -> str:
    if isinstance(value, DictConfig | ListConfig):
        return str(OmegaConf.to_container(value, resolve=False))
    return repr(value)


def check_target_node(node: DictConfig, path: str) -> None:
    """Types and ranges of the parameters of one ``_target_`` node."""
    cls = _target_class(node.get("_target_"))
    if cls is None:
        return
    hints = parameter_hints(cls)
    rules = rules_of(cls)
    for key in node:
        key = str(key)
        if key.startswith("_") or (key not in hints and key not in rules):
            continue
        full_key = f"{path}.{key}"
        value = _value(node, key, full_key)
        if isinstance(value, DictConfig) and "_target_" in value:
            continue  # a nested object: checked on its own
        hint, default = hints.get(key, (Any, inspect.Parameter.empty))
        wanted = _type_problem(value, hint)
        example = "" if default in (inspect.Parameter.empty, None) else f", e.g. {default!r}"
        if wanted:
            raise LatentzooError(
                f"{full_key} must be {wanted}, got {_show(value)}; "
                f"set {full_key}=... to {wanted}{example}"
            )
        rule = rules.get(key)
        if rule is None or value is None:
            continue
        items = value if isinstance(value, ListConfig | list | tuple) else [value]
        if not all(rule.holds(item) for item in items):
            listed = isinstance(value, ListConfig | list | tuple)
            what = f"each entry of {full_key}" if listed else full_key
            raise LatentzooError(
                f"{what} must be {describe(rule)}, got {_show(value)}; "
                f"set {full_key}=... to {describe(rule)}{example}"
            )


def check_node(node: Any, path: str) -> None:
    """Missing values, types and ranges of ``node`` and of the ``_target_`` nodes below it."""
    if isinstance(node, DictConfig) and not node._is_none():
        for full_key, target_node in _target_nodes(node, path):
            check_target_node(target_node, full_key)


def check_loggers(loggers: Any) -> None:
    """A logger whose package is missing: name the package and the alternative.

    Lightning's logger modules import without their package, so the class is found either way;
    a target that does not import at all is matched by its class name."""
    if not isinstance(loggers, DictConfig):
        return
    for name, logger in loggers.items():
        target = str(logger.get("_target_") or "") if isinstance(logger, DictConfig) else ""
        cls = _target_class(target)
        keys = [_class_key(b) for b in cls.__mro__] if isinstance(cls, type) else []
        entry = next((LOGGER_PACKAGES[k] for k in keys if k in LOGGER_PACKAGES), None)
        if entry is None and target:
            short = "." + target.rsplit(".", 1)[-1]
            entry = next((v for k, v in LOGGER_PACKAGES.items() if k.endswith(short)), None)
        if entry is None or find_spec(entry[0]) is not None:
            continue
        if entry[0] == "tensorboard" and find_spec("tensorboardX") is not None:
            continue
        raise LatentzooError(
            f"logger.{name} needs the {entry[0]} package, which is not installed; "
            f"pip install {entry[1]} (or latentzoo[loggers]), or use logger=csv"
        )


def check_accelerator(trainer: Any, key: str = "trainer.accelerator") -> None:
    """``trainer=gpu`` (or ``devices=N``) on a machine without that many GPUs."""
    if not isinstance(trainer, DictConfig):
        return
    accelerator = str(trainer.get("accelerator") or "auto")
    if accelerator not in ("gpu", "cuda"):
        return
    import torch

    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if available == 0:
        raise LatentzooError(
            f"{key}={accelerator} needs a CUDA GPU, but torch sees none "
            f"(torch {torch.__version__}, cuda {torch.version.cuda}); "
            + (
                "use device=cpu or device=auto"
                if key == "device"
                else "use trainer=cpu, or trainer=default (picks the GPU when there is one)"
            )
        )
    devices = trainer.get("devices")
    if isinstance(devices, int) and devices > available:
        raise LatentzooError(
            f"trainer.devices={devices} but this machine has {available} GPU(s); "
            f"set trainer.devices={available} (or -1 for all)"
        )


def check_values(node: DictConfig, rules: Mapping[str, Rule], path: str = "") -> None:
    """Rules for plain (non-``_target_``) settings, e.g. the top level of an entry config."""
    for key, rule in rules.items():
        if key not in node:
            continue
        full_key = f"{path}.{key}" if path else key
        value = _value(node, key, full_key)
        if value is not None and not rule.holds(value):
            raise LatentzooError(
                f"{full_key} must be {describe(rule)}, got {_show(value)}; "
                f"set {full_key}=... to {describe(rule)}"
            )


def validate_config(cfg: DictConfig, groups: Sequence[str] = GROUPS) -> None:
    """Check the config groups ``groups`` of a composed config (those present); raise
    :class:`LatentzooError` at the first problem."""
    for name in groups:
        if name in cfg:
            check_node(cfg.get(name), name)
    if "logger" in groups:
        check_loggers(cfg.get("logger"))
    if "trainer" in groups:
        check_accelerator(cfg.get("trainer"))
        device = cfg.get("device")  # entry configs without a trainer (cache_latents)
        if device in ("cuda", "gpu") and not cfg.get("trainer"):
            check_accelerator(OmegaConf.create({"accelerator": device}), key="device")


def validate_train(cfg: DictConfig) -> None:
    """Everything ``train.py`` can check before building anything: the model/data pair, then
    the values of every group."""
    check_pair(cfg)
    validate_config(cfg)
    from latentzoo.ensemble.members import ensemble_requested  # imports models: only when asked
    from latentzoo.ensemble.run import check_ensemble

    if ensemble_requested(cfg):
        check_ensemble(cfg)


def validate_eval(cfg: DictConfig) -> None:
    """``eval.py``'s checks before the checkpoint is read. The model comes from the checkpoint:
    ``model=`` only names its type, so only its ``_target_`` counts."""
    if not cfg.get("ckpt_path"):
        raise LatentzooError(NO_CHECKPOINT)
    validate_config(cfg, [g for g in GROUPS if g != "model"])


NO_CHECKPOINT = "eval needs a checkpoint; add ckpt_path=<path/to/.ckpt> to the command"


# entry config -> its checks (the ``task`` of the ValidateConfig Hydra callback)
TASK_CHECKS = {"train": validate_train, "eval": validate_eval, "cache_latents": validate_config}


def weight_shapes(state_dict: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """``{name: shape}`` of a state dict (kept instead of the tensors)."""
    return {name: tuple(getattr(t, "shape", ())) for name, t in state_dict.items()}


def mismatched_shapes(
    saved: Mapping[str, tuple[int, ...]], built: Mapping[str, tuple[int, ...]]
) -> list[str]:
    """``name is [saved] there, [built] here`` for the weights both have in another shape (a
    model may build some modules later, in ``setup``, so a missing name is not a mismatch)."""
    return [
        f"{name} is {list(saved[name])} there, {list(shape)} here"
        for name, shape in built.items()
        if name in saved and tuple(saved[name]) != tuple(shape)
    ]


def changed_values(saved: Any, current: Any, path: str) -> list[str]:
    """``key: saved -> current`` for the scalar settings that differ between two configs."""
    if isinstance(saved, Mapping | DictConfig) and isinstance(current, Mapping | DictConfig):
        out = []
        for key in dict.fromkeys([*saved.keys(), *current.keys()]):
            out += changed_values(saved.get(key), current.get(key), f"{path}.{key}")
        return out
    if isinstance(saved, DictConfig | ListConfig):
        saved = OmegaConf.to_container(saved, resolve=True)
    if isinstance(current, DictConfig | ListConfig):
        current = OmegaConf.to_container(current, resolve=True)
    return [] if saved == current else [f"{path} is {saved!r} there, {current!r} now"]


def check_weights_fit(
    model: Any,
    saved_shapes: Mapping[str, tuple[int, ...]],
    ckpt_path: str,
    saved_model_cfg: Any,
    model_cfg: Any,
) -> None:
    """Refuse to resume from a checkpoint whose weights do not fit the configured model, naming
    the model settings that differ."""
    problems = mismatched_shapes(saved_shapes, weight_shapes(model.state_dict()))
    if not problems:
        return
    changed = changed_values(saved_model_cfg, model_cfg, "model") if saved_model_cfg else []
    why = f" ({'; '.join(changed[:3])})" if changed else ""
    more = f" and {len(problems) - 1} more" if len(problems) > 1 else ""
    raise LatentzooError(
        f"the checkpoint {ckpt_path} holds a model of another shape{why}: {problems[0]}{more}; "
        "resume with the checkpoint's model settings (drop the model overrides that differ) or "
        "train from scratch without ckpt_path"
    )
