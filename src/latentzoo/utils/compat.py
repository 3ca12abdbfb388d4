"""Which data families each model accepts, stated once: train.py and eval.py refuse any other
pair before building anything, the README's config-group table and tests/test_matrix.py read it.

A dataset's family follows from its datamodule class (the first class of its MRO listed in
``DATA_FAMILIES``), so a new data config of an existing class needs no entry here.
"""

from __future__ import annotations

from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf

from latentzoo.utils.errors import LatentzooError

# family -> what its batches hold (the README shows this)
FAMILIES = {
    "images": "unlabelled images: (x, 0)",
    "labelled_images": "class-labelled images: (x, y)",
    "factor_sets": "ground-truth factor sets: (x, factor classes)",
    "sequences": "transformation sequences: {frames, k, factors}",
    "latents": "cached first-stage latents: {latent, label}",
    "multi_object": "multi-object scenes: (x, 0); faces with TPS prior pairs: {image, prior_image}",
}

# datamodule class (module.qualname as defined) -> family; subclasses inherit
DATA_FAMILIES = {
    "latentzoo.data.multishapes.ProcMultiShapesDataModule": "multi_object",
    "latentzoo.data.multishapes.CLEVRERFramesDataModule": "multi_object",
    "latentzoo.data.celeba_mafl.CelebAMAFLDataModule": "multi_object",
    "latentzoo.data.labelled.LabelledImageDataModule": "labelled_images",
    "latentzoo.data.datasets.proc_digits.ProcDigitsDataModule": "labelled_images",
    "latentzoo.data.images.ImageDataModule": "images",
    "latentzoo.data.ground_truth.GroundTruthDataModule": "factor_sets",
    "latentzoo.data.sequence_datamodule.SequenceDataModule": "sequences",
    "latentzoo.data.latents.LatentsDataModule": "latents",
}

# model class -> the families it trains on (its step() and its experiments)
MODEL_ACCEPTS = {
    "latentzoo.models.beta_vae.BetaVAE": ("factor_sets", "images"),
    "latentzoo.models.beta_tcvae.BetaTCVAE": ("factor_sets", "images"),
    "latentzoo.models.factor_vae.FactorVAE": ("factor_sets", "images"),
    "latentzoo.models.lie_vae.LieVAE": ("factor_sets", "images"),
    "latentzoo.models.kl_autoencoder.KLAutoencoder": ("images", "factor_sets"),
    "latentzoo.models.latent_fm.LatentFlowMatching": ("images", "labelled_images", "latents"),
    "latentzoo.models.latent_flow.LatentFlow": ("sequences",),
    "latentzoo.models.nfpi.NFPI": ("labelled_images",),  # class-conditional: needs labels
    "latentzoo.models.soft_intro_vae.SoftIntroVAE": ("images", "labelled_images"),
    "latentzoo.models.dlp.DeepLatentParticles": ("multi_object", "images"),
}


def _lookup(target: str, table: dict[str, object]) -> object | None:
    """The table entry of ``target``'s class or its nearest listed base class."""
    try:
        cls = get_class(target)
    except Exception:  # unknown target: instantiate reports it with its own message
        return None
    for base in cls.__mro__:
        entry = table.get(f"{base.__module__}.{base.__qualname__}")
        if entry is not None:
            return entry
    return None


def data_family(data_target: str) -> str | None:
    """The family of a datamodule ``_target_``; None for a class this table does not know."""
    return _lookup(data_target, DATA_FAMILIES)  # type: ignore[return-value]


def model_accepts(model_target: str) -> tuple[str, ...] | None:
    """The families a model ``_target_`` accepts; None for a model this table does not know."""
    return _lookup(model_target, MODEL_ACCEPTS)  # type: ignore[return-value]


def check_compatible(
    model_cfg: DictConfig, data_cfg: DictConfig, names: dict | None = None
) -> None:
    """Refuse a model/data pair from a family the model does not accept, in one line.

    ``names`` (Hydra's ``runtime.choices``) names the configs in the message; a model or
    datamodule class outside the tables (user code) is not checked."""
    model_target, data_target = model_cfg.get("_target_"), data_cfg.get("_target_")
    if not model_target or not data_target:
        return
    accepts, family = model_accepts(model_target), data_family(data_target)
    if accepts is None or family is None or family in accepts:
        return
    names = names or {}
    model = names.get("model") or model_target.rsplit(".", 1)[-1]
    data = names.get("data") or data_target.rsplit(".", 1)[-1]
    raise LatentzooError(
        f"model={model} does not train on data={data} ({family}); it accepts "
        f"{', '.join(accepts)} datasets (see the compatibility matrix in README.md)"
    )


def config_choices(cfg: DictConfig | None = None) -> dict:
    """The config names picked on the command line (``model=``, ``data=``), for messages: from
    ``cfg.hydra`` when the config has it (Hydra callbacks run before HydraConfig is set)."""
    from hydra.core.hydra_config import HydraConfig

    choices = OmegaConf.select(cfg, "hydra.runtime.choices") if cfg is not None else None
    if choices is not None:
        return dict(choices)
    return dict(HydraConfig.get().runtime.choices) if HydraConfig.initialized() else {}


def check_pair(cfg: DictConfig) -> None:
    """:func:`check_compatible` on a train config's ``model`` and ``data``."""
    check_compatible(cfg.model, cfg.data, config_choices(cfg))
