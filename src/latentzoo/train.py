"""The train task: build data, model, callbacks, loggers and trainer from the config; fit; test.

Entry points: ``python train.py ...`` in the repo, or the ``latentzoo-train`` console script.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from omegaconf import DictConfig

from latentzoo.callbacks.checkpointing import stop_if_interrupted
from latentzoo.callbacks.randomness import TrainingRandomness
from latentzoo.callbacks.run_info import ResumeReport
from latentzoo.ensemble import ensemble_requested, train_ensemble
from latentzoo.ensemble.members import ensemble_argv
from latentzoo.paths import config_dir, setup_project_root
from latentzoo.utils import (
    RankedLogger,
    extras,
    get_metric_value,
    instantiate_callbacks,
    instantiate_loggers,
    log_hyperparameters,
    task_wrapper,
)
from latentzoo.utils.checkpoint import (
    ConfigInCheckpoint,
    check_same_model,
    checkpoint_config,
    load_checkpoint,
    trusts_checkpoint,
)
from latentzoo.utils.checkpoint_io import install_atomic_checkpoint_io
from latentzoo.utils.distributed import resolve_batch_size, set_matmul_precision, strategy_for
from latentzoo.utils.entry import run_hydra_task
from latentzoo.utils.resume import checkpoint_to_resume, skip_finished
from latentzoo.utils.run_record import RunRecord, record_run
from latentzoo.utils.validation import check_weights_fit, validate_train, weight_shapes

log = RankedLogger(__name__, rank_zero_only=True)


@task_wrapper
@skip_finished  # resume=auto: a run dir that records a finished run is not trained again
@record_run
def train(cfg: DictConfig, record: RunRecord) -> tuple[dict[str, Any], dict[str, Any]]:
    """Train (and optionally test) the model; return the logged metrics and built objects.

    Called as ``train(cfg)``: ``record_run`` supplies ``record`` and writes
    ``<output_dir>/metrics.json`` (final metrics, or the error of a failed run).
    """
    validate_train(cfg)  # also for train(cfg) called from code: before anything is built
    if ensemble_requested(cfg):  # K seeds of one model in one process: latentzoo/ensemble
        return train_ensemble(cfg, record)
    set_matmul_precision(cfg.get("float32_matmul_precision"))
    if cfg.get("seed") is not None:  # the same initial weights on every rank
        L.seed_everything(cfg.seed, workers=True)

    ckpt_path = checkpoint_to_resume(cfg)  # cfg.ckpt_path, or with resume=auto the own last.ckpt
    saved_shapes: dict[str, tuple[int, ...]] = {}  # of the checkpoint's weights
    if ckpt_path:
        checkpoint = load_checkpoint(ckpt_path, trust=trusts_checkpoint(cfg))  # weights_only
        # resume builds this run's own config, never the saved one: no target check needed
        saved_cfg = checkpoint_config(checkpoint, ckpt_path, trust=True)
        check_same_model(saved_cfg, cfg.model._target_, ckpt_path)
        saved_shapes = weight_shapes(checkpoint.get("state_dict", {}))
        log.info(
            f"Resuming from {ckpt_path}: saved at global step {checkpoint.get('global_step')}, "
            f"epoch {checkpoint.get('epoch')}"
        )
        del checkpoint

    log.info(f"Instantiating model <{cfg.model._target_}>")
    model: L.LightningModule = hydra.utils.instantiate(cfg.model)
    if ckpt_path:  # e.g. model.latent_dim=6 against a 10-d checkpoint: one line, not fit's
        check_weights_fit(model, saved_shapes, ckpt_path, saved_cfg.get("model"), cfg.model)

    callbacks = instantiate_callbacks(cfg.get("callbacks"))
    callbacks += [ConfigInCheckpoint(cfg), ResumeReport()]
    if cfg.get("seed") is not None:  # per-rank training randomness, saved for exact resume
        callbacks.insert(0, TrainingRandomness(cfg.seed))  # first: see its docstring
    # the last appended logger keeps callback-logged scores (e.g. disentanglement) for the record
    loggers = [*instantiate_loggers(cfg.get("logger")), record.logged]
    strategy_for(cfg.trainer, model)
    log.info(f"Instantiating trainer <{cfg.trainer._target_}>")
    trainer: L.Trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers)
    # every save: temp file + rename, finite weights only; every load: weights_only
    install_atomic_checkpoint_io(trainer, trust=trusts_checkpoint(cfg))
    record.trainer = trainer

    # the world size is known now, before any data is read
    data_cfg = resolve_batch_size(cfg.data, trainer.world_size)
    log.info(f"Instantiating datamodule <{cfg.data._target_}>")
    datamodule: L.LightningDataModule = hydra.utils.instantiate(data_cfg)

    objects = {"cfg": cfg, "datamodule": datamodule, "model": model, "trainer": trainer}
    log_hyperparameters(objects)

    if cfg.get("train"):
        log.info("Starting training")
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
        stop_if_interrupted(trainer)  # SIGINT/SIGTERM: last.ckpt saved; exit with resume command
        save_final_last(trainer)
    train_metrics = dict(trainer.callback_metrics)

    test_metrics: dict[str, Any] = {}
    if cfg.get("test"):
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        if not best:
            log.warning("No best checkpoint found; testing the current weights")
        log.info(f"Testing {'checkpoint ' + best if best else 'current weights'}")
        trainer.test(model, datamodule=datamodule, ckpt_path=best or None, weights_only=True)
        test_metrics = dict(trainer.callback_metrics)

    final = {**record.logged.metrics, **train_metrics, **test_metrics}
    metrics = {key: float(value) for key, value in final.items()}
    return metrics, objects


def save_final_last(trainer: L.Trainer) -> None:
    """Rewrite ``last.ckpt`` after fit when it is older than the final step.

    ``last.ckpt`` follows a step/time cadence and validation, so a run whose ``max_steps`` ends
    between two saves would otherwise lose its final steps."""
    callback = trainer.checkpoint_callback
    if callback is None or not callback.save_last or not callback.dirpath:
        return
    if getattr(callback, "_last_global_step_saved", None) == trainer.global_step:
        return
    last = Path(callback.dirpath, callback.CHECKPOINT_NAME_LAST + callback.FILE_EXTENSION)
    trainer.save_checkpoint(last)
    callback.last_model_path = str(last)


def checked_train(cfg: DictConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """The CLI's task: the config checks before ``extras`` prints the resolved config, then
    :func:`train` (whose record keeps a failure in a sweep)."""
    validate_train(cfg)
    extras(cfg)
    return train(cfg)


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="train.yaml")
def _hydra_main(cfg: DictConfig) -> float | None:
    result = run_hydra_task(checked_train, cfg)
    if result is None:  # a sweep job refused with a user error: NaN marks a failed trial
        return float("nan") if cfg.get("optimized_metric") else None
    return get_metric_value(result[0], cfg.get("optimized_metric"))


def main() -> None:
    """Console-script entry point (``latentzoo-train``)."""
    setup_project_root()
    sys.argv = ensemble_argv(sys.argv)
    _hydra_main()


if __name__ == "__main__":
    main()
