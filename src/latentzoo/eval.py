"""The eval task: rebuild model and data from the checkpoint's saved config, run the test loop
and any configured metrics, print a table and write ``metrics.json`` to the eval run dir.

Entry points: ``python eval.py ckpt_path=...`` in the repo, or ``latentzoo-eval``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher
from omegaconf import DictConfig, OmegaConf, open_dict

from latentzoo.metrics.capabilities import check_metric_set
from latentzoo.paths import config_dir, setup_project_root
from latentzoo.utils import (
    LatentzooError,
    RankedLogger,
    extras,
    instantiate_callbacks,
    instantiate_loggers,
    print_metrics_table,
    task_wrapper,
)
from latentzoo.utils.checkpoint import (
    check_finite,
    check_same_model,
    checkpoint_config,
    load_checkpoint,
    trusts_checkpoint,
)
from latentzoo.utils.compat import check_compatible, config_choices, data_family
from latentzoo.utils.distributed import resolve_batch_size
from latentzoo.utils.entry import run_hydra_task
from latentzoo.utils.validation import NO_CHECKPOINT, validate_eval

log = RankedLogger(__name__, rank_zero_only=True)


@task_wrapper
def evaluate(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    """Evaluate the checkpoint at ``cfg.ckpt_path``; return the metrics and built objects."""
    if not cfg.get("ckpt_path"):
        raise LatentzooError(NO_CHECKPOINT)
    trust = trusts_checkpoint(cfg)  # else: weights_only load, only allowlisted _target_s
    checkpoint = load_checkpoint(cfg.ckpt_path, trust=trust)
    saved = checkpoint_config(checkpoint, cfg.ckpt_path, trust=trust)
    check_finite(checkpoint, cfg.ckpt_path)
    # another dataset (data=...) must be one the saved model accepts, with its image shape
    check_compatible(saved.model, cfg.data if cfg.get("data") else saved.data, config_choices())
    check_same_inputs(saved, cfg.get("data"), config_choices())
    if cfg.get("model"):
        check_same_model(saved, cfg.model.get("_target_"), cfg.ckpt_path)
        log.info("Using the model config saved in the checkpoint (model= only checks the type)")
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)

    data_cfg = resolve_batch_size(eval_data_config(cfg.get("data"), saved.data), world_size=1)
    log.info(f"Instantiating datamodule <{data_cfg._target_}>")
    datamodule: L.LightningDataModule = hydra.utils.instantiate(data_cfg)
    log.info(f"Instantiating model <{saved.model._target_}> from {cfg.ckpt_path}")
    model: L.LightningModule = hydra.utils.instantiate(saved.model)
    model.on_load_checkpoint(checkpoint)  # lets models restore e.g. EMA weights
    model.load_state_dict(checkpoint["state_dict"])
    step = checkpoint.get("global_step")
    del checkpoint

    trainer: L.Trainer = hydra.utils.instantiate(
        cfg.trainer,
        callbacks=instantiate_callbacks(cfg.get("callbacks")),
        logger=instantiate_loggers(cfg.get("logger")) or False,
    )
    # every metric set's needs (capabilities, factors, weights) before the test loop runs
    evaluators = {
        name: hydra.utils.instantiate(c) for name, c in (cfg.get("metrics") or {}).items()
    }
    for name, evaluator in evaluators.items():
        check_metric_set(evaluator, model, datamodule, name)

    metrics: dict[str, float] = {}
    protocols: dict[str, Any] = {}  # per metric set: what its numbers depend on (preset, seeds)
    if cfg.get("test_loop"):
        for results in trainer.test(model, datamodule=datamodule):
            metrics.update({key: float(value) for key, value in results.items()})

    if evaluators:
        start_processes(trainer)
    model.to(trainer.strategy.root_device)  # metrics encode/sample on the eval device
    for name, evaluator in evaluators.items():
        log.info(f"Computing {name}")
        values = evaluator(model=model, datamodule=datamodule)
        metrics.update({f"{name}/{key}": float(value) for key, value in values.items()})
        if hasattr(evaluator, "record"):
            protocols[name] = evaluator.record()

    if not trainer.is_global_zero:  # every rank holds the same (reduced) metrics
        return metrics, {"cfg": cfg, "model": model, "datamodule": datamodule, "trainer": trainer}
    print_metrics_table(metrics, title=f"eval: {Path(cfg.ckpt_path).name} (step {step})")
    output = Path(cfg.paths.output_dir, "metrics.json")
    output.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "ckpt_path": str(Path(cfg.ckpt_path).resolve()),
        "global_step": step,
        "model": saved.model._target_,
        "data": OmegaConf.to_container(data_cfg),
        "metrics": metrics,
        "protocols": protocols,
    }
    output.write_text(json.dumps(report, indent=2))
    log.info(f"Metrics written to {output}")
    return metrics, {"cfg": cfg, "model": model, "datamodule": datamodule, "trainer": trainer}


def start_processes(trainer: L.Trainer) -> None:
    """Under a multi-process trainer (``trainer=ddp``, torchrun, SLURM) whose test loop did not
    run, start the other ranks and the process group, so metrics shard their sampling."""
    if trainer.world_size == 1 or torch.distributed.is_initialized():
        return
    launcher = trainer.strategy.launcher
    if launcher is not None and not isinstance(launcher, _SubprocessScriptLauncher):
        raise LatentzooError(
            f"eval metrics cannot run under {type(launcher).__name__} (ddp_spawn); use "
            "trainer.strategy=ddp or torchrun"
        )
    if launcher is not None:
        launcher.launch(lambda: None)  # the other ranks re-run this command up to here
    trainer.strategy.setup_environment()


def eval_data_config(data: DictConfig | None, saved: DictConfig) -> DictConfig:
    """The data to evaluate on: the checkpoint's own, or ``data=...`` with split sizes that fit.

    Eval reads only the test split. On the dataset the checkpoint was trained on, the split
    settings not given on the command line are the checkpoint's, so its test split is exactly
    the held-out one. On other factor data the validation split is dropped (``val_size=0``) unless
    given: ``data=proc_dsprites data.dataset.size=small`` then tests 4,096 of the 4,608 images
    instead of refusing because validation and test (4,096 each) exceed the grid."""
    if not data:
        return saved
    data = data.copy()
    given = {o.split("=", 1)[0].lstrip("+~") for o in task_overrides()}
    free = [key for key in SPLIT_KEYS if key in data and f"data.{key}" not in given]
    if not free or data_family(str(data.get("_target_"))) != "factor_sets":
        return data
    same_dataset = OmegaConf.to_container(data.get("dataset"), resolve=True) == (
        OmegaConf.to_container(saved.get("dataset"), resolve=True) if saved.get("dataset") else None
    )
    with open_dict(data):
        for key in free:
            if same_dataset and key in saved:
                data[key] = saved[key]
            elif key == "val_size":
                data[key] = 0
    log.info(f"eval splits: {', '.join(f'{k}={data[k]}' for k in SPLIT_KEYS if k in data)}")
    return data


SPLIT_KEYS = ("val_size", "test_size", "split_seed")


def task_overrides() -> list[str]:
    """The command-line overrides of this run (empty outside Hydra)."""
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def check_same_inputs(saved: DictConfig, data: DictConfig | None, names: dict) -> None:
    """``data=...`` whose images have another shape than those the model was trained on."""
    if not data or "image_shape" not in data or "image_shape" not in saved.data:
        return
    new, old = list(data.image_shape), list(saved.data.image_shape)
    if new != old:
        raise LatentzooError(
            f"data={names.get('data') or data._target_} gives images of shape {new}, but the "
            f"checkpoint's model takes {old}; evaluate on data with {old} images, or leave "
            "data= out to use the checkpoint's own data"
        )


def checked_evaluate(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    """The CLI's task: config checks, then ``extras`` (which prints the resolved config), then
    :func:`evaluate`. ``model=`` only names the checkpoint's model type, so only its
    ``_target_`` is kept: its other values may refer to a ``data`` that eval does not have."""
    validate_eval(cfg)
    if cfg.get("model"):
        with open_dict(cfg):
            cfg.model = {"_target_": cfg.model._target_}
    extras(cfg)
    return evaluate(cfg)


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="eval.yaml")
def _hydra_main(cfg: DictConfig) -> None:
    run_hydra_task(checked_evaluate, cfg)


def main() -> None:
    """Console-script entry point (``latentzoo-eval``)."""
    setup_project_root()
    _hydra_main()


if __name__ == "__main__":
    main()
