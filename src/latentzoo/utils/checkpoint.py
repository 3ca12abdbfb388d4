"""The checkpoint carries its resolved config, so eval and resume need no repeated overrides."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning as L
import yaml
from omegaconf import DictConfig, OmegaConf

from latentzoo.utils.errors import CheckpointError
from latentzoo.utils.safe_load import check_config_targets, describe_unreadable, read_checkpoint

CHECKPOINT_KEY = "latentzoo"


class ConfigInCheckpoint(L.Callback):
    """Stores the resolved run config (model, data, trainer, seed, ...) in every checkpoint.

    Resolved at fit setup, after train.py has settled the per-device batch size."""

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg
        self.config: dict | None = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        self.config = OmegaConf.to_container(self.cfg, resolve=True, throw_on_missing=False)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        if self.config is None:
            self.setup(trainer, pl_module, "fit")
        checkpoint[CHECKPOINT_KEY] = {"config": self.config}


def trusts_checkpoint(cfg: DictConfig) -> bool:
    """``trust_checkpoint=true``: the user vouches for the checkpoint's source (pickled objects
    and any ``_target_`` in its config are then loaded as they are)."""
    value = cfg.get("trust_checkpoint")
    if isinstance(value, str):
        return value.strip().lower() in ("true", "yes", "1")
    return bool(value)


def load_checkpoint(path: str | os.PathLike, trust: bool = False) -> dict[str, Any]:
    """Read a checkpoint file on the CPU without running code from it (``weights_only=True``,
    see :mod:`latentzoo.utils.safe_load`), with clear errors for missing or corrupt files."""
    path = Path(path).expanduser()
    if not path.is_file():
        hint = ""
        if path.parent.is_dir():
            found = sorted(p.name for p in path.parent.glob("*.ckpt"))
            hint = f" (checkpoints in {path.parent}: {', '.join(found) or 'none'})"
        raise CheckpointError(
            f"ckpt_path '{path}' does not exist or is not a file; "
            f"pass the path of a .ckpt file{hint}"
        )
    if not os.access(path, os.R_OK):
        raise CheckpointError(f"ckpt_path '{path}' is not readable (check its permissions).")
    try:
        # mmap: the train task only reads the config here, and Lightning loads the file again
        return read_checkpoint(path, trust=trust, mmap=True)
    except CheckpointError:
        raise
    except Exception as error:  # torch raises many types for corrupt files
        raise CheckpointError(
            f"ckpt_path '{path}' could not be read as a PyTorch checkpoint: "
            f"{describe_unreadable(path, error)}. Point ckpt_path at a .ckpt written by train.py."
        ) from error


def check_finite(checkpoint: dict[str, Any], path: str | os.PathLike) -> None:
    """Refuse a checkpoint whose weights (``state_dict``) or EMA average hold NaN/inf."""
    from latentzoo.utils.checkpoint_io import describe_entries, nonfinite_entries

    bad = nonfinite_entries(checkpoint)
    if bad:
        raise CheckpointError(
            f"'{path}' holds non-finite weights (NaN/inf in {describe_entries(bad)}); "
            "evaluate an earlier checkpoint of the run."
        )


def checkpoint_config(
    checkpoint: dict[str, Any], path: str | os.PathLike, trust: bool = False
) -> DictConfig:
    """The run config saved in a latentzoo checkpoint. Its model and data sections (what eval
    builds) may only name allowlisted ``_target_``s unless ``trust``."""
    saved = checkpoint.get(CHECKPOINT_KEY)
    if not saved or "config" not in saved:
        raise CheckpointError(
            f"'{path}' was not written by latentzoo's train task (it has no saved config), so "
            "eval.py cannot rebuild its model and data."
        )
    config = saved["config"]
    if isinstance(config, str):  # a YAML string is as safe to load as plain containers
        config = yaml.safe_load(config)
    config = OmegaConf.create(config)
    sections = {key: config.get(key) for key in ("model", "data")}
    check_config_targets(sections, path, trust)
    return config


def check_same_model(saved: DictConfig, requested_target: str | None, path: str) -> None:
    """Refuse a checkpoint whose model class differs from the one requested."""
    saved_target = saved.get("model", {}).get("_target_")
    if requested_target and saved_target and saved_target != requested_target:
        raise CheckpointError(
            f"'{path}' holds a {saved_target} model, but the config asks for "
            f"{requested_target}. Use a checkpoint of that model, or drop the model= override."
        )
