"""Import a released Latent Flow Matching checkpoint (VinAIResearch/LFM) as a latentzoo one.

    python -m latentzoo.import_lfm lfm_ckpt=ffhq_f8_adm/model_475.pth out=ffhq_adm.ckpt \\
        data=ffhq256 model/backbone=adm
    python eval.py ckpt_path=ffhq_adm.ckpt metrics=fid

The model is composed like a training run (``experiment=``, ``data=``, ``model/backbone=``
``dit_l2 | dit_b2 | ... | adm | adm_guided``, ``model.backbone.*`` overrides), with
``time_convention: lfm`` (LFM's t = 0 is data: the net receives 1 − t and its output is
negated) and ``ema_decay: null`` (LFM's released weights are the raw, or already swapped-in EMA,
weights). The LFM file (a bare ``model_<epoch>.pth`` state dict, or a ``content.pth`` with
``model_dict``) is read with ``weights_only=True``; a DDP ``module.`` prefix is removed; parameter
names are mapped per backbone and **every** name and shape is checked before anything is written:
a mismatch is refused in one line naming the first unmatched keys.

Name mappings (spec §12.4: LFM itself strips 7 characters from every key blindly):
- DiT (facebookresearch/DiT names) -> ``nets.dit`` (``convert_reference_dit_state_dict``); the
  fixed ``pos_embed`` must equal ours; an unconditional LFM DiT (1-row label table, LFM's
  ``num_classes 1``) has its constant label row folded into the time-MLP bias, which is exact.
- adm (EDM's DhariwalUNet) -> ``nets.unet_edm``: same names; EDM's fixed [1, 1] resampling
  filters are checked and dropped.
- adm_guided (guided-diffusion UNetModel) -> ``nets.unet_adm``: same names.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn

from latentzoo.models.nets.dit import DiT, convert_reference_dit_state_dict
from latentzoo.models.nets.unet_adm import ADMUNet
from latentzoo.models.nets.unet_edm import DhariwalUNet
from latentzoo.paths import config_dir, setup_project_root
from latentzoo.utils.atomic import atomic_write
from latentzoo.utils.checkpoint import CHECKPOINT_KEY
from latentzoo.utils.entry import run_hydra_task
from latentzoo.utils.errors import CheckpointError, LatentzooError

log = logging.getLogger(__name__)

_EDM_FILTER = torch.full((1, 1, 2, 2), 0.25)  # EDM's resample_filter [1, 1] ⊗ [1, 1] / 4


def read_lfm_checkpoint(path: str | Path, unsafe_load: bool = False) -> dict[str, torch.Tensor]:
    """The state dict in an LFM checkpoint file (bare, or ``model_dict`` of a content.pth)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"LFM checkpoint '{path}' does not exist or is not a file")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=not unsafe_load)
    except Exception as error:
        raise CheckpointError(
            f"'{path}' could not be read with weights_only=True ({type(error).__name__}); pass "
            "LFM's model_<epoch>.pth, or unsafe_load=true for a content.pth you trust"
        ) from error
    if isinstance(raw, dict) and "model_dict" in raw:
        raw = raw["model_dict"]
    if not isinstance(raw, dict) or not raw or not all(torch.is_tensor(v) for v in raw.values()):
        raise CheckpointError(f"'{path}' holds no state dict of tensors (not an LFM checkpoint)")
    return {
        key: value.float() if value.is_floating_point() else value
        for key, value in strip_ddp_prefix(raw).items()
    }


def strip_ddp_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove the ``module.`` prefix of a DDP-wrapped model's state dict (from every key, or
    none: a partial prefix is left for the key check to report)."""
    if state and all(key.startswith("module.") for key in state):
        return {key[len("module.") :]: value for key, value in state.items()}
    return state


def _convert_dit(state: dict[str, torch.Tensor], net: nn.Module) -> dict[str, torch.Tensor]:
    if "pos_embed" in state:
        ours = net.pos_embed.to(state["pos_embed"].dtype)
        if state["pos_embed"].shape != ours.shape or not torch.allclose(
            state["pos_embed"], ours, atol=1e-5
        ):
            raise CheckpointError(
                f"the LFM DiT's pos_embed {tuple(state['pos_embed'].shape)} differs from this "
                f"DiT's {tuple(ours.shape)}: another image size or patch size (check data= and "
                "model/backbone=)"
            )
    state = convert_reference_dit_state_dict(state)
    table = state.get("y_embedder.weight")
    if table is not None and net.y_embedder is None and table.shape[0] == 1:
        # LFM's unconditional DiT (num_classes 1, no dropout) always adds row 0 to c = t_emb +
        # y_emb: the same constant as a bias of the time MLP's last linear
        state = dict(state)
        del state["y_embedder.weight"]
        state["t_embedder.mlp.2.bias"] = state["t_embedder.mlp.2.bias"] + table[0]
        log.info("folded the LFM DiT's single (unconditional) label row into the time-MLP bias")
    return state


def _convert_edm(state: dict[str, torch.Tensor], net: nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        if key.endswith("resample_filter"):
            if value.shape != _EDM_FILTER.shape or not torch.allclose(value, _EDM_FILTER):
                raise CheckpointError(
                    f"'{key}' is not EDM's [1, 1] resampling filter; this adm net cannot load it"
                )
            continue
        out[key] = value
    return out


def _convert_guided(state: dict[str, torch.Tensor], net: nn.Module) -> dict[str, torch.Tensor]:
    return dict(state)


CONVERTERS: dict[type, Callable[[dict[str, torch.Tensor], nn.Module], dict[str, torch.Tensor]]] = {
    DiT: _convert_dit,
    DhariwalUNet: _convert_edm,
    ADMUNet: _convert_guided,
}


def check_state_dict(state: dict[str, torch.Tensor], net: nn.Module, shown: int = 4) -> None:
    """Refuse (one line) unless ``state`` has exactly ``net``'s parameter names and shapes."""
    expected = net.state_dict()
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    shapes = [
        f"{key} {tuple(state[key].shape)} vs {tuple(value.shape)}"
        for key, value in expected.items()
        if key in state and state[key].shape != value.shape
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing (e.g. {', '.join(missing[:shown])})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:shown])})")
    if shapes:
        problems.append(f"{len(shapes)} of other shape (e.g. {'; '.join(shapes[:shown])})")
    if problems:
        raise CheckpointError(
            f"the LFM weights do not match {type(net).__name__}: {' | '.join(problems)}; check "
            "model/backbone= and its settings (channel_mult, attention_resolutions, ...) "
            "against LFM's arguments"
        )


def convert_lfm_state_dict(
    state: dict[str, torch.Tensor], net: nn.Module
) -> dict[str, torch.Tensor]:
    """Map an LFM state dict onto ``net`` (a latentzoo backbone) and check every key."""
    converter = CONVERTERS.get(type(net))
    if converter is None:
        raise LatentzooError(
            f"no LFM import for a {type(net).__name__} backbone; use model/backbone=dit_* | adm "
            "| adm_guided"
        )
    converted = converter(strip_ddp_prefix(state), net)
    check_state_dict(converted, net)
    return converted


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _force_lfm_settings(cfg: DictConfig) -> None:
    """LFM's time convention (t = 0 data) and no EMA, whatever the composed preset says."""
    with open_dict(cfg):
        if cfg.model.get("time_convention") != "lfm":
            log.info("setting model.time_convention=lfm (LFM's t = 0 is data)")
        cfg.model.time_convention = "lfm"
        cfg.model.ema_decay = None


def _null_label_settings(cfg: DictConfig, state: dict[str, torch.Tensor], backbone: type) -> None:
    """A DiT table with num_classes + 1 rows, or any class-conditional EDM net (whose null
    label is the zero one-hot), has a null label; a DiT null row means LFM trained with label
    dropout > 0, which the config must state."""
    num_classes = int(cfg.model.get("num_classes") or 0)
    if not num_classes:
        return
    with open_dict(cfg):
        if backbone is DhariwalUNet:
            cfg.model.null_class = True
        table = state.get("y_embedder.embedding_table.weight")
        if table is not None and table.shape[0] == num_classes + 1:
            cfg.model.null_class = True
            if not cfg.model.get("label_dropout"):
                raise LatentzooError(
                    "this LFM DiT has a null label row, so it was trained with label dropout: "
                    "pass model.label_dropout=<p> (LFM's ImageNet DiT-B/2: 0.1)"
                )


def _saved_config(cfg: DictConfig) -> dict[str, Any]:
    """The resolved run config, as train.py's ConfigInCheckpoint stores it."""
    config = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    config.pop("hydra", None)
    return config


def import_lfm(cfg: DictConfig) -> Path:
    """Build the configured LatentFlowMatching, load the LFM weights into its net, write ``out``."""
    if not cfg.get("lfm_ckpt") or not cfg.get("out"):
        raise LatentzooError(
            "usage: python -m latentzoo.import_lfm lfm_ckpt=<LFM .pth> out=<latentzoo .ckpt> "
            "data=<dataset> model/backbone=<dit_l2|adm|adm_guided|...>"
        )
    source = Path(cfg.lfm_ckpt).expanduser()
    state = read_lfm_checkpoint(source, unsafe_load=bool(cfg.get("unsafe_load")))
    target = cfg.model.backbone._target_
    _force_lfm_settings(cfg)
    _null_label_settings(cfg, state, hydra.utils.get_class(target))
    log.info(f"Instantiating <{cfg.model._target_}> with backbone <{target}>")
    model: L.LightningModule = hydra.utils.instantiate(cfg.model)
    model.net.load_state_dict(convert_lfm_state_dict(state, model.net), strict=True)
    checkpoint: dict[str, Any] = {
        "epoch": 0,
        "global_step": 0,
        "pytorch-lightning_version": L.__version__,
        "state_dict": model.state_dict(),
        CHECKPOINT_KEY: {"config": _saved_config(cfg)},
        "lfm_import": {"source": str(source.resolve()), "sha256": _sha256(source)},
    }
    model.on_save_checkpoint(checkpoint)  # the model's own entries (metadata, lean first stage)
    out = Path(cfg.out).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(out) as file:
        torch.save(checkpoint, file)
    params = sum(p.numel() for p in model.net.parameters())
    log.info(f"wrote {out} ({type(model.net).__name__}, {params / 1e6:.2f}M parameters)")
    return out


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="import_lfm.yaml")
def _hydra_main(cfg: DictConfig) -> None:
    run_hydra_task(import_lfm, cfg)


def main() -> None:
    """Console-script entry point (``latentzoo-import-lfm``)."""
    setup_project_root()
    _hydra_main()


if __name__ == "__main__":
    main()
