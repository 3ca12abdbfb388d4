"""Which members an ``ensemble:`` config asks for, and the single-run config each one is.

    python train.py experiment=beta_vae_proc_dsprites ensemble.seeds='[0,1,2,3]'
    python train.py experiment=lie_vae_dsprites ensemble.seeds='range(4)' \
        ensemble.vary='{model.beta: [1, 2, 4, 8]}'

Member k is *the* single run ``python train.py <same overrides> seed=<s_k> <key>=<v_k>``: its
config is the run config with that seed and those values and no ensemble (and, when the ensemble
spreads its members over several devices, one device: a member never spans devices), and its run dir
(``<run>/members/seed_<s>``) holds that config and those overrides, so that eval, resume and
``collect`` read it as that run.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from latentzoo.utils.errors import LatentzooError

SUPPORTED_MODELS = {
    "latentzoo.models.BetaVAE": "beta_vae",
    "latentzoo.models.BetaTCVAE": "beta_tcvae",
    "latentzoo.models.FactorVAE": "factor_vae",
    "latentzoo.models.LieVAE": "lie_vae",
    "latentzoo.models.beta_vae.BetaVAE": "beta_vae",
    "latentzoo.models.beta_tcvae.BetaTCVAE": "beta_tcvae",
    "latentzoo.models.factor_vae.FactorVAE": "factor_vae",
    "latentzoo.models.lie_vae.LieVAE": "lie_vae",
}


# what makes a multi-device run's config the config of a member's one-device single run
ONE_DEVICE = {"trainer.devices": 1, "trainer.num_nodes": 1, "trainer.strategy": "auto"}


@dataclass
class Member:
    """One member: its seed, its varied values (``{"model.beta": 4.0}``), its config and the
    trainer settings that put its single run on one device (empty when the run already is)."""

    seed: int
    values: dict[str, Any] = field(default_factory=dict)
    cfg: DictConfig | None = None
    one_device: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"seed_{self.seed}"


def spans_devices(cfg: DictConfig) -> bool:
    """Whether ``cfg.trainer`` runs on more than one device (trainer=ddp, devices=-1, ...)."""
    trainer = cfg.trainer
    return (
        str(trainer.get("devices", 1)) != "1"
        or int(trainer.get("num_nodes") or 1) != 1
        or "ddp" in str(trainer.get("strategy") or "")
    )


def ensemble_argv(argv: list[str]) -> list[str]:
    """The ensemble's command-line forms that Hydra alone would refuse, made Hydra's own:
    ``ensemble.seeds=range(10)`` (Hydra takes ``range()`` for a sweep and asks for
    ``--multirun``) becomes the string ``'range(10)'``, and ``ensemble.vary.model.beta=[...]``
    (a new key under ``vary``) gets its ``+``."""
    seed_range = re.compile(r"^(\+?ensemble\.seeds=)(range\([^)]*\))$")
    out = []
    for arg in argv:
        arg = seed_range.sub(r"\1'\2'", arg)
        if arg.startswith("ensemble.vary.") and "=" in arg:
            arg = f"+{arg}"
        out.append(arg)
    return out


def ensemble_requested(cfg: DictConfig) -> bool:
    ensemble = cfg.get("ensemble")
    return ensemble is not None and ensemble.get("seeds") is not None


def parse_seeds(value: Any) -> list[int]:
    """``[0, 1, 2]``, ``'range(10)'``, ``'range(5, 10)'`` or a count ``10`` (= range(10))."""
    if isinstance(value, int) and not isinstance(value, bool):
        seeds = list(range(value))
    elif isinstance(value, str):
        match = re.fullmatch(r"\s*range\(\s*(-?\d+)\s*(?:,\s*(-?\d+)\s*)?\)\s*", value)
        if not match:
            raise LatentzooError(
                f"ensemble.seeds='{value}' is not understood: give a list ('[0,1,2]'), "
                "'range(N)', 'range(A,B)' or a count"
            )
        a, b = match.groups()
        seeds = list(range(int(a))) if b is None else list(range(int(a), int(b)))
    elif OmegaConf.is_list(value) or isinstance(value, list | tuple):
        items = OmegaConf.to_container(value) if OmegaConf.is_list(value) else value
        seeds = [int(s) for s in items]
    else:
        raise LatentzooError(f"ensemble.seeds must be a list of ints, got {value!r}")
    if not seeds:
        raise LatentzooError("ensemble.seeds is empty: give at least one seed")
    if len(set(seeds)) != len(seeds):
        raise LatentzooError(f"ensemble.seeds has repeated seeds {seeds}: members need their own")
    return seeds


def _flatten_vary(node: Any, prefix: str = "") -> dict[str, list[Any]]:
    """``{model: {beta: [1, 2]}}`` or ``{"model.beta": [1, 2]}`` -> ``{"model.beta": [1, 2]}``."""
    out: dict[str, list[Any]] = {}
    items = node.items() if isinstance(node, dict) else OmegaConf.to_container(node).items()
    for key, value in items:
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten_vary(value, f"{path}."))
        elif isinstance(value, list):
            out[path] = value
        else:
            raise LatentzooError(f"ensemble.vary.{path} must be a list (one value per member)")
    return out


def members_of(cfg: DictConfig) -> list[Member]:
    """The members of ``cfg.ensemble``, each with its single-run config (checked, not built)."""
    target = cfg.model.get("_target_")
    if target not in SUPPORTED_MODELS:
        raise LatentzooError(
            f"ensemble training supports beta_vae, beta_tcvae, factor_vae and lie_vae, not "
            f"{target}; drop ensemble.seeds and sweep seeds with -m seed=... instead"
        )
    seeds = parse_seeds(cfg.ensemble.seeds)
    vary_node = cfg.ensemble.get("vary")
    vary = _flatten_vary(vary_node) if vary_node else {}
    for key, values in vary.items():
        if not key.startswith("model."):
            raise LatentzooError(
                f"ensemble.vary.{key}: only scalar model loss weights may vary across members "
                "(e.g. model.beta, model.gamma, model.capacity)"
            )
        if len(values) != len(seeds):
            raise LatentzooError(
                f"ensemble.vary.{key} has {len(values)} values for {len(seeds)} seeds: give one "
                "value per member"
            )
        if any(not isinstance(v, int | float) or isinstance(v, bool) for v in values):
            raise LatentzooError(f"ensemble.vary.{key} must hold numbers, got {values}")
        if OmegaConf.select(cfg, key) is None and OmegaConf.select(cfg, key, default=0) == 0:
            raise LatentzooError(f"ensemble.vary.{key}: the model config has no key {key}")
    one_device = ONE_DEVICE if spans_devices(cfg) else {}
    members = []
    for k, seed in enumerate(seeds):
        values = {key: vals[k] for key, vals in vary.items()}
        config = member_config(cfg, seed, {**values, **one_device})
        members.append(Member(seed, values, config, dict(one_device)))
    return members


def member_config(cfg: DictConfig, seed: int, values: dict[str, Any]) -> DictConfig:
    """The config of the single run that a member is: seed and values set, no ensemble."""
    member = cfg.copy()
    with open_dict(member):
        member.seed = seed
        member.ensemble = None
        for key, value in values.items():
            OmegaConf.update(member, key, value, merge=False, force_add=True)
    return member


def member_overrides(overrides: list[str], member: Member) -> list[str]:
    """The run's CLI overrides as the member's single run would have them: ``ensemble.*``
    dropped, ``seed``, each varied key and (for a multi-device ensemble) one device set."""
    own = {
        "seed": str(member.seed),
        **{k: str(v) for k, v in member.values.items()},
        **{k: str(v) for k, v in member.one_device.items()},
    }
    kept = []
    for item in overrides:
        key = item.split("=", 1)[0].lstrip("+~")
        if key == "ensemble" or key.startswith("ensemble.") or key in own:
            continue
        kept.append(item)
    return [*kept, *(f"{key}={value}" for key, value in own.items())]
