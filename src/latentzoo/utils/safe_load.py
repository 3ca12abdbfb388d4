"""Checkpoints from elsewhere cannot run code: they load with ``torch.load(weights_only=True)``,
and their saved config may only instantiate ``_target_``s from an allowlist.

- New checkpoints hold only tensors and plain values (:func:`to_plain` runs on every save).
- Older latentzoo checkpoints (omegaconf objects in ``hyper_parameters``, raw numpy RNG states)
  load with ``weights_only=True`` and a short list of extra harmless types, are converted, and a
  one-line notice says so. ``python -m latentzoo.utils.safe_load OLD.ckpt NEW.ckpt`` converts one
  for good.
- Anything else (a pickle naming other globals, a config naming other targets) is refused in one
  line; ``trust_checkpoint=true`` loads it anyway, for checkpoints whose source you trust.
"""

from __future__ import annotations

import os
import sys
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from pathlib import Path, PurePath
from typing import Any

import numpy as np
import torch
from omegaconf import Container, DictConfig, ListConfig, OmegaConf

from latentzoo.utils.errors import CheckpointError
from latentzoo.utils.logging import RankedLogger

log = RankedLogger(__name__, rank_zero_only=True)

TRUST_HINT = "only if you trust its source, pass trust_checkpoint=true"

# Top-level packages a checkpoint's config may instantiate from: latentzoo and the declared
# dependencies (pyproject.toml, incl. the diffusers extra) that hold models, data or training
# parts. Left out on purpose: hydra/omegaconf (instantiate/call would nest arbitrary targets),
# joblib (pickle), and packages with no buildable parts (rich, rootutils, matplotlib, ...).
ALLOWED_PACKAGES = frozenset(
    {
        "latentzoo",
        "torch",
        "torchvision",
        "lightning",
        "torchmetrics",
        "einops",
        "torchdiffeq",
        "webdataset",
        "numpy",
        "scipy",
        "sklearn",
        "h5py",
        "PIL",
        "diffusers",
        "transformers",
    }
)
# Parts of allowed packages that load code or pickles; refused like an outside target.
DENIED_PREFIXES = (
    "torch.hub",
    "torch.load",
    "torch.jit.load",
    "torch.package",
    "torch.ops",
    "torch.classes",
    "torch.utils.cpp_extension",
    "torch.utils.model_zoo",
    "numpy.load",
    "numpy.ctypeslib",
    "lightning.pytorch.cli",
)
DENIED_NAMES = ("load_from_checkpoint", "load_library", "load_inline", "load_state_dict_from_url")
# Config switches that make an allowed target load untrusted code or pickles.
UNSAFE_SWITCHES = {
    "trust_remote_code": True,
    "weights_only": False,
    "allow_pickle": True,
    "unsafe_load": True,
}


# ---- saving: only plain values -------------------------------------------------------------


def to_plain(value: Any) -> Any:
    """``value`` with omegaconf containers, numpy values and paths made plain (dict, list,
    tensor, int, float, str), so that ``torch.load(weights_only=True)`` reads it back.
    Containers with nothing to convert are returned as they are (a ``state_dict`` keeps its
    ``_metadata``)."""
    if isinstance(value, torch.Tensor | str | int | float | bool | None):
        return value
    if isinstance(value, Container):
        return OmegaConf.to_container(value, resolve=True, throw_on_missing=False)
    if isinstance(value, Mapping):
        plain = {key: to_plain(item) for key, item in value.items()}
        if all(plain[key] is item for key, item in value.items()):
            return value
        return OrderedDict(plain) if isinstance(value, OrderedDict) else plain
    if isinstance(value, list | tuple) and not hasattr(value, "_fields"):
        items = [to_plain(item) for item in value]
        if all(new is old for new, old in zip(items, value, strict=True)):
            return value
        return items if isinstance(value, list) else tuple(items)
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, PurePath):
        return str(value)
    return value


# ---- loading: weights_only, old format converted -------------------------------------------


def _numpy_globals() -> list[Any]:
    """What ``np.random.get_state()``'s key array needs to unpickle (numpy 1.x and 2.x names)."""
    core = np._core if hasattr(np, "_core") else np.core  # noqa: NPY201
    found = [core.multiarray._reconstruct, np.ndarray, np.dtype]
    found += [getattr(np.dtypes, name) for name in ("UInt32DType",) if hasattr(np, "dtypes")]
    return found


def _old_format_globals() -> list[Any]:
    """The extra types an older latentzoo checkpoint pickled: omegaconf containers (model
    ``hyper_parameters``) and numpy RNG states. Each only rebuilds data, never calls code."""
    import collections
    import typing

    from omegaconf import base, nodes

    return [
        DictConfig,
        ListConfig,
        base.ContainerMetadata,
        base.Metadata,
        nodes.AnyNode,
        nodes.StringNode,
        nodes.IntegerNode,
        nodes.FloatNode,
        nodes.BooleanNode,
        typing.Any,
        collections.defaultdict,
        dict,
        list,
        int,
        float,
        str,
        bool,
        *_numpy_globals(),
    ]


def _global_name(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', obj)}"


def _old_format_names() -> set[str]:
    names = {_global_name(obj) for obj in _old_format_globals()}
    names |= {"numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct"}
    return names


def _unsafe_globals(path: Path) -> list[str]:
    """The globals the file's pickle names beyond torch's weights-only set (read, not run)."""
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # not a zip checkpoint: the weights-only load below reports it
        return []


def read_checkpoint(path: str | os.PathLike, trust: bool = False, mmap: bool = False) -> dict:
    """``torch.load`` a latentzoo checkpoint without running code from it.

    ``weights_only=True``; an older latentzoo checkpoint is converted (one-line notice); other
    pickled objects are refused (:class:`CheckpointError`) unless ``trust``. Raises the loader's
    own exception for a file that is not a checkpoint at all (see :func:`describe_unreadable`)."""
    path = Path(path)
    extra = _unsafe_globals(path)
    if extra and trust:
        log.warning(f"{path}: trust_checkpoint=true, loading pickled objects ({', '.join(extra)})")
        return torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
    if not extra:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    outside = sorted(set(extra) - _old_format_names())
    if outside:
        raise CheckpointError(
            f"'{path}' holds pickled objects that could run code when loaded "
            f"({', '.join(outside[:4])}{' ...' if len(outside) > 4 else ''}); it was refused. "
            f"Use a checkpoint written by latentzoo, or {TRUST_HINT}"
        )
    with torch.serialization.safe_globals(_old_format_globals()):
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    if not isinstance(checkpoint, dict) or "latentzoo" not in checkpoint:
        raise CheckpointError(
            f"'{path}' holds pickled omegaconf/numpy objects but was not written by latentzoo; "
            f"it was refused. {TRUST_HINT[0].upper()}{TRUST_HINT[1:]}"
        )
    log.warning(
        f"{path}: older latentzoo checkpoint format (pickled omegaconf/numpy objects), loaded "
        "safely and converted; `python -m latentzoo.utils.safe_load OLD NEW` converts it for good"
    )
    return upgrade(checkpoint)


def upgrade(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """An older latentzoo checkpoint in today's plain form (omegaconf containers as dicts and
    lists, ``TrainingRandomness``'s raw RNG tuples as its tensor form)."""
    from latentzoo.callbacks.randomness import rng_to_checkpoint

    checkpoint = to_plain(checkpoint)
    for name, state in (checkpoint.get("callbacks") or {}).items():
        if name.startswith("TrainingRandomness") and isinstance(state, dict):
            state["rng"] = [
                rng_to_checkpoint(tuple(s)) if isinstance(s, tuple | list) else s
                for s in state.get("rng") or []
            ]
    return checkpoint


def describe_unreadable(path: Path, error: Exception) -> str:
    """Why ``path`` is not a checkpoint, in words that point the right way."""
    size = path.stat().st_size if path.exists() else 0
    if size == 0:
        return "the file is empty (0 bytes): the save was interrupted or the copy failed"
    with path.open("rb") as file:
        head = file.read(4)
    if head[:2] == b"PK":
        return f"the zip archive is damaged or cut short ({size} bytes; {error})"
    if head[:1] == b"\x80":  # a legacy (non-zip) torch.save file
        return f"it is a legacy pickle checkpoint that the safe loader could not read ({error})"
    if all(32 <= b < 127 or b in (9, 10, 13) for b in head):
        return "it is a text file, not a PyTorch checkpoint (an HTML page or a Git LFS pointer?)"
    return f"it is not a PyTorch checkpoint ({size} bytes of unknown data)"


# ---- the saved config: only allowlisted targets --------------------------------------------


def _targets(node: Any, where: str) -> Iterator[tuple[str, str]]:
    if isinstance(node, Mapping):
        for key, value in node.items():
            if key == "_target_":
                yield where, str(value)
            else:
                yield from _targets(value, f"{where}.{key}" if where else str(key))
    elif isinstance(node, list | tuple):
        for index, value in enumerate(node):
            yield from _targets(value, f"{where}[{index}]")


def _switches(node: Any, where: str) -> Iterator[str]:
    if isinstance(node, Mapping):
        for key, value in node.items():
            here = f"{where}.{key}" if where else str(key)
            if key in UNSAFE_SWITCHES and value is UNSAFE_SWITCHES[key]:
                yield f"{here}={value}"
            elif isinstance(value, str) and value.strip().startswith("pipe:"):
                yield f"{here}={value!r} (a shell command)"
            else:
                yield from _switches(value, here)
    elif isinstance(node, list | tuple):
        for index, value in enumerate(node):
            if isinstance(value, str) and value.strip().startswith("pipe:"):
                yield f"{where}[{index}]={value!r} (a shell command)"
            else:
                yield from _switches(value, f"{where}[{index}]")


def target_allowed(target: str) -> bool:
    """Whether a checkpoint's config may instantiate ``target`` (see :data:`ALLOWED_PACKAGES`)."""
    parts = target.split(".")
    if parts[0] not in ALLOWED_PACKAGES or any(p.startswith("_") for p in parts[1:]):
        return False
    if parts[-1] in DENIED_NAMES:
        return False
    return not any(target == p or target.startswith(p + ".") for p in DENIED_PREFIXES)


def check_config_targets(config: Any, path: str | os.PathLike, trust: bool = False) -> None:
    """Refuse a checkpoint's config (the sections eval builds) that names a target outside the
    allowlist, or switches on loading remote code/pickles, unless ``trust``."""
    if trust:
        return
    plain = OmegaConf.to_container(config) if isinstance(config, Container) else config
    for where, target in _targets(plain, ""):
        if not target_allowed(target):
            raise CheckpointError(
                f"'{path}' config names _target_ {target} (at {where}), outside the allowlist "
                f"(latentzoo and its dependencies); it was refused. {TRUST_HINT[0].upper()}"
                f"{TRUST_HINT[1:]}"
            )
    for switch in _switches(plain, ""):
        raise CheckpointError(
            f"'{path}' config sets {switch}, which would load code from elsewhere; it was "
            f"refused. {TRUST_HINT[0].upper()}{TRUST_HINT[1:]}"
        )


def main(argv: list[str] | None = None) -> None:
    """``python -m latentzoo.utils.safe_load OLD.ckpt NEW.ckpt``: write an older latentzoo
    checkpoint in today's format (it then loads without the notice)."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        raise SystemExit("usage: python -m latentzoo.utils.safe_load OLD.ckpt NEW.ckpt")
    from latentzoo.utils.atomic import atomic_write

    checkpoint = upgrade(read_checkpoint(args[0]))
    with atomic_write(Path(args[1]), "wb") as file:
        torch.save(checkpoint, file)
    print(f"wrote {args[1]}")


if __name__ == "__main__":
    main()
