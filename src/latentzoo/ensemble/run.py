"""The ensemble train task: K members of one model in one process (``ensemble.seeds=...``).

Called from ``latentzoo.train.train`` when ``ensemble.seeds`` is set. Each member k:

- is built after ``seed_everything(s_k)``, exactly as ``train.py seed=s_k`` builds its model;
- reads its own training stream: the datamodule's resumable loader with seed ``data.seed`` or,
  when that is null (the default), ``s_k`` (as the single run's sampler takes the run seed);
- draws its noise from generators seeded ``rank_seed(s_k, 0)``, as ``TrainingRandomness``
  seeds the single run (:mod:`latentzoo.ensemble.noise`);
- writes ``<run>/members/seed_<s_k>/``: ``.hydra/{config,overrides}.yaml`` of that single run,
  ``metrics.json`` in the single-run schema, ``csv/version_0/metrics.csv`` (the CSV logger's
  layout) and ``checkpoints/last.ckpt`` (state_dict, optimizer and scheduler states, Lightning's
  loop state, the config, the training stream) that ``eval.py`` reads, and ``train.py seed=s_k
  ckpt_path=...`` resumes, like any single run's (:mod:`latentzoo.ensemble.single_run_state`).

The ensemble itself checkpoints to ``<run>/checkpoints/ensemble_last.ckpt`` (every member's
weights, optimizer moments, noise streams, loader positions, dropped members; one entry per
member) on the ``callbacks.model_checkpoint.every_n_train_steps`` cadence and at the end;
``resume=auto`` or ``ckpt_path=<that file>`` continues it exactly, on any number of devices.

Several devices (``trainer=ddp``, ``trainer=ddp_sim``): the *members* are split over the ranks
in contiguous blocks (Lightning Fabric launches the processes as the Trainer does). A member never
spans devices, so member k is still ``train.py seed=s_k`` on one device (``data.batch_size`` and
``data.global_batch_size`` are that single run's); the ranks do not talk while training, only
when the ensemble checkpoint is gathered on rank 0 and when the final metrics are averaged.

Per member as in its single run (:mod:`latentzoo.ensemble.extras`): validation on the trainer's
schedule, the disentanglement and image-grid callbacks, the model's lr scheduler. Not per member:
best-checkpoint selection by ``val/loss`` and the other callbacks (each named in a warning).
Ctrl-C and SIGTERM save at a step boundary and exit as a single run does
(:mod:`latentzoo.ensemble.stopping`).
"""

from __future__ import annotations

import contextlib
import json
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import numpy as np
import torch
import torch.distributed as dist
import yaml
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from latentzoo.callbacks.randomness import rng_to_checkpoint
from latentzoo.ensemble.engine import StackedEnsemble
from latentzoo.ensemble.extras import MemberExtras, loader_draws_seed
from latentzoo.ensemble.members import Member, member_overrides, members_of
from latentzoo.ensemble.noise import MemberGenerators
from latentzoo.ensemble.single_run_state import (
    checkpoint_callback_states,
    loader_position,
    single_run_training_state,
)
from latentzoo.ensemble.stopping import StopSignals
from latentzoo.utils.atomic import atomic_write, atomic_write_text
from latentzoo.utils.checkpoint import CHECKPOINT_KEY, load_checkpoint, trusts_checkpoint
from latentzoo.utils.checkpoint_io import TrainingInterrupted
from latentzoo.utils.distributed import resolve_batch_size, set_matmul_precision
from latentzoo.utils.errors import LatentzooError
from latentzoo.utils.logging import RankedLogger
from latentzoo.utils.safe_load import to_plain

log = RankedLogger(__name__, rank_zero_only=True)

ENSEMBLE_CKPT = "ensemble_last.ckpt"


STRATEGIES = ("auto", "ddp", "single_device")  # what Fabric runs the members' split with


def check_ensemble(cfg: DictConfig) -> list[Member]:
    """Refuse what the ensemble cannot do, before anything is built; the members."""
    members = members_of(cfg)
    trainer = cfg.trainer
    strategy = str(trainer.get("strategy") or "auto")
    if strategy not in STRATEGIES:
        raise LatentzooError(
            f"ensemble training splits its members over devices with trainer.strategy=ddp; "
            f"trainer.strategy={strategy} is not supported (use trainer=ddp or one device)"
        )
    devices, nodes = trainer.get("devices", 1), int(trainer.get("num_nodes") or 1)
    if isinstance(devices, int) and devices > 0:  # -1 / "auto": counted at launch
        _check_fills(len(members), devices * nodes)
    if trainer.get("precision", "32-true") not in ("32-true", "32", 32):
        raise LatentzooError("ensemble training supports trainer.precision=32-true only")
    if trainer.get("accumulate_grad_batches", 1) != 1:
        raise LatentzooError("ensemble training does not accumulate gradients")
    if not trainer.get("max_steps") or trainer.max_steps < 0:
        raise LatentzooError("ensemble training counts steps: set trainer.max_steps")
    return members


def launch(cfg: DictConfig, num_members: int) -> L.Fabric:
    """The processes of ``cfg.trainer`` (one, or one per device under DDP), launched."""
    trainer = cfg.trainer
    accelerator = str(trainer.get("accelerator") or "auto")
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise LatentzooError("trainer.accelerator asks for a GPU but none is visible")
    fabric = L.Fabric(
        accelerator=accelerator,
        devices=trainer.get("devices") or "auto",
        num_nodes=int(trainer.get("num_nodes") or 1),
        strategy=str(trainer.get("strategy") or "auto"),
        precision="32-true",
    )
    _check_fills(num_members, fabric.world_size)
    fabric.launch()
    return fabric


def _check_fills(num_members: int, world: int) -> None:
    if world > num_members:
        raise LatentzooError(
            f"an ensemble of {num_members} members cannot fill {world} devices: give at least "
            f"{world} seeds or fewer trainer.devices"
        )


def member_block(num_members: int, rank: int, world: int) -> range:
    """The members that ``rank`` trains: contiguous blocks, sizes differing by at most one."""
    bounds = np.linspace(0, num_members, world + 1).round().astype(int)
    return range(int(bounds[rank]), int(bounds[rank + 1]))


def gather_to_rank_zero(items: list[Any]) -> list[Any]:
    """Every rank's ``items``, concatenated in rank order, on rank 0 (``[]`` elsewhere)."""
    if _world() == 1:
        return list(items)
    parts: list[Any] | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(items, parts, dst=0)
    return [item for part in parts or [] for item in part]


def gather_to_all(items: list[Any]) -> list[Any]:
    """Every rank's ``items``, concatenated in rank order, on every rank."""
    if _world() == 1:
        return list(items)
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, items)
    return [item for part in parts for item in part]


def _world() -> int:
    """The number of processes of this run (1 without a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _barrier() -> None:
    if _world() > 1:
        dist.barrier()


def build_members(cfg: DictConfig, members: list[Member]) -> list[torch.nn.Module]:
    """Each member's model, built after ``seed_everything(seed)`` as its single run builds it."""
    models = []
    for member in members:
        L.seed_everything(member.seed, workers=True, verbose=False)
        models.append(hydra.utils.instantiate(member.cfg.model))
    return models


class MemberLoaders:
    """The members' training loaders (one per member seed) over one datamodule's dataset."""

    def __init__(self, datamodule: Any, data_seed: int | None, members: list[Member]) -> None:
        self.loaders = []
        for member in members:
            datamodule.seed = member.seed if data_seed is None else data_seed
            loader = datamodule.train_dataloader()
            loader.sampler.single_process = True  # the member's own run is on one device
            self.loaders.append(loader)
        self.batches_per_epoch = len(self.loaders[0])
        self.epoch = 0
        self._iters: list[Any] | None = None

    def limit(self, limit_train_batches: float | int) -> None:
        n = len(self.loaders[0])
        if isinstance(limit_train_batches, int) and not isinstance(limit_train_batches, bool):
            self.batches_per_epoch = min(n, limit_train_batches)
        elif float(limit_train_batches) != 1.0:
            self.batches_per_epoch = int(n * float(limit_train_batches))

    def next(self) -> list[Any]:
        """The members' next batches; a new epoch (all together) when this one is spent."""
        while True:
            if self._iters is None:
                for loader in self.loaders:
                    loader.sampler.set_epoch(self.epoch)
                self._iters = [iter(loader) for loader in self.loaders]
            if self.loaders[0].state_dict()["consumed"] < self.batches_per_epoch:
                try:
                    return [next(it) for it in self._iters]
                except StopIteration:
                    pass
            self._iters = None
            self.epoch += 1
            for loader in self.loaders:
                loader.load_state_dict({"epoch": self.epoch, "consumed": 0})

    def load_state_dicts(self, states: list[dict[str, int]]) -> None:
        """Restore every member's position (its loader's ``state_dict``)."""
        for loader, saved in zip(self.loaders, states, strict=True):
            loader.load_state_dict(saved)
        self.epoch = self.loaders[0].sampler.pass_start()[0]  # a finished epoch moves on
        self._iters = None


class MemberCSVLogger(CSVLogger):
    """Lightning's CSV logger writes on global rank 0 only; under ``trainer=ddp`` every rank
    writes the logs of its own members (their run dirs are that rank's alone)."""

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        with _as_rank_zero():
            super().log_metrics(metrics, step)

    def finalize(self, status: str) -> None:
        with _as_rank_zero():
            super().finalize(status)


@contextlib.contextmanager
def _as_rank_zero() -> Iterator[None]:
    saved = rank_zero_only.rank
    rank_zero_only.rank = 0
    try:
        yield
    finally:
        rank_zero_only.rank = saved


def _images(batches: list[Any], device: torch.device) -> torch.Tensor:
    xs = [b[0] if isinstance(b, list | tuple) else b for b in batches]
    return torch.stack(xs).to(device, non_blocking=True)


def _save(path: Path, obj: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as handle:
        torch.save(obj, handle)


class EnsembleRun:
    """The ensemble's training loop, checkpoints and per-member outputs."""

    def __init__(self, cfg: DictConfig, all_members: list[Member], fabric: L.Fabric) -> None:
        self.cfg = cfg
        self.all_members = all_members
        self.rank = fabric.global_rank
        block = member_block(len(all_members), self.rank, fabric.world_size)
        self.offset = block.start  # the ensemble index of this rank's first member
        self.members = [all_members[k] for k in block]
        members = self.members
        self.root = Path(cfg.paths.output_dir)
        self.device = fabric.device
        set_matmul_precision(cfg.get("float32_matmul_precision"))
        data_cfg = resolve_batch_size(cfg.data, 1)
        self.datamodule = hydra.utils.instantiate(data_cfg)
        self.datamodule.setup("fit")
        models = build_members(cfg, members)
        for model in models:  # what BetaTCVAE.setup reads from the training loader
            if getattr(model, "dataset_size", 0) is None:
                model.dataset_size = len(self.datamodule.train_dataloader().dataset)
        trainer = cfg.trainer
        self.ensemble = StackedEnsemble(
            models,
            [m.seed for m in members],
            self.device,
            vectorize=cfg.ensemble.get("vectorize", "auto"),
            gradient_clip_val=trainer.get("gradient_clip_val"),
            gradient_clip_algorithm=trainer.get("gradient_clip_algorithm") or "norm",
        )
        self.loaders = MemberLoaders(self.datamodule, cfg.data.get("seed"), members)
        self.loaders.limit(trainer.get("limit_train_batches", 1.0))
        self.step = 0
        self.log_every = int(trainer.get("log_every_n_steps") or 50)
        ckpt_cfg = (cfg.get("callbacks") or {}).get("model_checkpoint") or {}
        self.save_every = ckpt_cfg.get("every_n_train_steps")
        self.loggers = [
            MemberCSVLogger(save_dir=str(self.member_dir(m)), name="csv", prefix="")
            for m in members
        ]
        self.last_logged: list[dict[str, float]] = [{} for _ in members]
        self.started = time.time()

    def member_dir(self, member: Member) -> Path:
        return self.root / "members" / member.name

    # --- training -----------------------------------------------------------------------------
    def fit(self) -> None:
        from tqdm.auto import tqdm

        max_steps = int(self.cfg.trainer.max_steps)
        show = bool(self.cfg.trainer.get("enable_progress_bar", True)) and self.rank == 0
        bar = tqdm(total=max_steps, initial=self.step, disable=not show, desc="ensemble")
        extras = MemberExtras(self)  # validation, disentanglement, lr schedulers per member
        with StopSignals() as stop:
            while self.step < max_steps:
                images = _images(self.loaders.next(), self.device)
                terms = self.ensemble.training_step(images, self.step)
                self.step += 1
                extras.after_step()
                bar.update(1)
                if self.step % self.log_every == 0 or self.step == max_steps:
                    self._log({f"train/{k}": v for k, v in terms.items()}, self.step - 1)
                    bar.set_postfix(alive=int(self.ensemble.alive.sum()))
                extras.after_batch()
                if self.save_every and self.step % int(self.save_every) == 0:
                    self.save()
                if stop.agreed(self.step):  # Ctrl-C / SIGTERM: save at this step boundary
                    self.save()
                    self._stop(stop.signum)
        bar.close()
        extras.train_end()

    def _stop(self, signum: int) -> None:
        """Exit 128 + signum after a signal's save, saying how to resume (as single runs do)."""
        path = self.root / "checkpoints" / ENSEMBLE_CKPT
        stopped = TrainingInterrupted(signal.Signals(signum).name, signum, str(path), self.step)
        if self.rank == 0:
            print(f"{stopped}. Resume with:\n  {stopped.resume_command}", file=sys.stderr)
        raise stopped

    def _log(self, terms: dict[str, torch.Tensor], step: int, epoch: bool = True) -> None:
        """One row per live member in its CSV (with the ``epoch`` column where Lightning adds
        it: not to callback-logged scores), kept for its ``metrics.json``."""
        values = {k: v.detach().cpu().tolist() for k, v in terms.items()}
        for k, logger in enumerate(self.loggers):
            if not bool(self.ensemble.alive[k]) and k in self.ensemble.dropped:
                continue  # its metrics stop where it stopped, as a failed single run's
            row = {name: float(v[k]) for name, v in values.items()}
            logger.log_metrics({**row, "epoch": self.loaders.epoch} if epoch else row, step=step)
            self.last_logged[k].update(row)

    def evaluate(self, stage: str, step: int | None = None) -> None:
        """Mean ``<stage>/*`` terms of every member over the split (at most
        ``trainer.limit_<stage>_batches`` batches), logged at ``step`` (default: the current
        one) and kept for ``metrics.json``."""
        loader = getattr(self.datamodule, f"{stage}_dataloader")()
        limit = self.cfg.trainer.get(f"limit_{stage}_batches", 1.0)
        n_batches = len(loader)
        if isinstance(limit, int) and not isinstance(limit, bool):
            n_batches = min(n_batches, limit)
        else:
            n_batches = int(n_batches * float(limit))
        sums: dict[str, torch.Tensor] = {}
        count = 0
        with self.ensemble.side_streams():  # the pass draws as the single run's, then undone
            if loader_draws_seed(loader):
                self.ensemble.draw_loader_seed()
            for i, batch in enumerate(loader):
                if i >= n_batches:
                    break
                x = batch[0] if isinstance(batch, list | tuple) else batch
                images = x.unsqueeze(0).expand(len(self.members), *x.shape).to(self.device)
                terms = self.ensemble.evaluate(images, stage)
                size = x.shape[0]
                for name, value in terms.items():
                    sums[name] = sums.get(name, 0) + value.detach().cpu() * size
                count += size
        if count:
            self._log(
                {f"{stage}/{k}": v / count for k, v in sums.items()},
                self.step if step is None else step,
            )

    # --- checkpoints --------------------------------------------------------------------------
    def save(self) -> None:
        """The ensemble checkpoint (gathered on rank 0), then every member's ``last.ckpt``."""
        own = [
            {
                "seed": member.seed,
                "values": member.values,
                "data": self.loaders.loaders[k].state_dict(),
                **self.ensemble.member_state(k),
            }
            for k, member in enumerate(self.members)
        ]
        entries = gather_to_rank_zero(own)
        if self.rank == 0:
            state = {
                "ensemble": {"step": self.step, "epoch": self.loaders.epoch, "members": entries},
                "global_step": self.step,
                CHECKPOINT_KEY: {"config": OmegaConf.to_container(self.cfg, resolve=True)},
            }
            _save(self.root / "checkpoints" / ENSEMBLE_CKPT, state)
        for k, member in enumerate(self.members):
            _save(self.member_dir(member) / "checkpoints" / "last.ckpt", self.member_checkpoint(k))
        _barrier()  # no rank runs ahead of a checkpoint that is not whole yet

    def member_checkpoint(self, k: int) -> dict[str, Any]:
        """Member k's ``last.ckpt`` in the single-run layout (keys Lightning and eval.py read)."""
        member = self.members[k]
        dropped = self.ensemble.dropped.get(k)
        step = dropped["step"] if dropped else self.step
        generators = self.ensemble.generators[k]
        # its single run's loader after `step` batches (a dropped member's stopped there; a
        # Ctrl-C between a batch's fetch and its step leaves the live loaders one ahead)
        loader_state = loader_position(step, self.loaders.batches_per_epoch)
        if dropped:  # its weights stopped at that step: so does its noise stream
            noise = self.ensemble._frozen[k].get("noise")  # the streams before that step
            if noise is not None:
                generators = MemberGenerators(member.seed)
                generators.load_state_dict(noise)
        return {
            # step, epoch and the loops' progress, as train.py seed=s's cadence save writes them
            **single_run_training_state(
                step,
                loader_state,
                self.loaders.batches_per_epoch,
                self.ensemble.models[k].automatic_optimization,
            ),
            "pytorch-lightning_version": L.__version__,
            "state_dict": self.ensemble.member_state_dict(k),
            "optimizer_states": self.ensemble.member_optimizer_states(k),
            "lr_schedulers": self.ensemble.member_scheduler_states(k),
            "hyper_parameters": to_plain(dict(self.ensemble.models[k].hparams)),  # as ckpt IO does
            "callbacks": {
                "TrainingRandomness": {
                    "seed": member.seed,
                    "world_size": 1,
                    "rng": [rng_to_checkpoint(generators.single_run_stream())],
                },
                **checkpoint_callback_states(
                    self.member_cfg(member), self.member_dir(member) / "checkpoints" / "last.ckpt"
                ),
            },
            "ensemble_member": {
                "seeds": [m.seed for m in self.all_members],
                "index": self.offset + k,
                "data": loader_state,
            },
            CHECKPOINT_KEY: {
                "config": OmegaConf.to_container(self.member_cfg(member), resolve=True)
            },
        }

    def member_cfg(self, member: Member) -> DictConfig:
        cfg = member.cfg.copy()
        cfg.paths.output_dir = str(self.member_dir(member))
        return cfg

    def resume_from(self, path: Path) -> None:
        state = load_checkpoint(path, trust=trusts_checkpoint(self.cfg))  # weights_only
        saved = state.get("ensemble")
        if saved is None or "members" not in saved:
            raise LatentzooError(
                f"{path} is not an ensemble checkpoint of this latentzoo (no 'ensemble.members')"
            )
        entries = saved["members"]
        seeds = [m.seed for m in self.all_members]
        saved_seeds = [e["seed"] for e in entries]
        saved_values = [e["values"] for e in entries]
        if saved_seeds != seeds or saved_values != [m.values for m in self.all_members]:
            raise LatentzooError(
                f"{path} holds members {saved_seeds} with values {saved_values}, but this "
                f"run asks for {seeds}: resume with the same ensemble settings"
            )
        own = entries[self.offset : self.offset + len(self.members)]
        self.ensemble.load_member_states(own)
        self.loaders.load_state_dicts([entry["data"] for entry in own])
        self.step = int(saved["step"])
        log.info(f"Resumed the ensemble from {path} at step {self.step}")

    # --- per-member run dirs ------------------------------------------------------------------
    def write_members(self, status: str, error: BaseException | None = None) -> None:
        overrides = _hydra_overrides(self.root)
        for k, member in enumerate(self.members):
            folder = self.member_dir(member)
            hydra_dir = folder / ".hydra"
            hydra_dir.mkdir(parents=True, exist_ok=True)
            config = OmegaConf.to_container(self.member_cfg(member), resolve=False)
            config.pop("hydra", None)
            atomic_write_text(hydra_dir / "config.yaml", yaml.safe_dump(config, sort_keys=False))
            atomic_write_text(
                hydra_dir / "overrides.yaml",
                yaml.safe_dump(member_overrides(overrides, member), sort_keys=False),
            )
            self.loggers[k].finalize("success")
            atomic_write_text(
                folder / "metrics.json", json.dumps(self.member_record(k, status, error), indent=2)
            )

    def member_record(self, k: int, status: str, error: BaseException | None) -> dict[str, Any]:
        """The single-run ``metrics.json`` schema (``utils.run_record``)."""
        dropped = self.ensemble.dropped.get(k)
        last = self.member_dir(self.members[k]) / "checkpoints" / "last.ckpt"
        record: dict[str, Any] = {
            "status": status,
            "global_step": dropped["step"] if dropped else self.step,
            "epoch": self.loaders.epoch,
            "metrics": dict(self.last_logged[k]),
            "best_model_path": None,
            "duration_s": round(time.time() - self.started, 3),
            "error": None if error is None else f"{type(error).__name__}: {error}",
            "ensemble": {"seeds": [m.seed for m in self.all_members], "index": self.offset + k},
        }
        if dropped:
            record["status"] = "failed"
            record["error"] = (
                f"NonFiniteLossError: the loss became non-finite at global step {dropped['step']} "
                f"(it was {dropped['loss']}); this member stopped there, the others went on"
            )
            record["last_checkpoint"] = str(last)
        return record


class _RecordView:
    """What ``utils.run_record`` reads from a trainer, for the ensemble dir's ``metrics.json``."""

    strategy = None
    checkpoint_callback = None
    ckpt_path = None
    interrupted = False

    def __init__(self, run: EnsembleRun) -> None:
        self._run = run

    @property
    def global_step(self) -> int:
        return self._run.step

    @property
    def current_epoch(self) -> int:
        return self._run.loaders.epoch


def _hydra_overrides(root: Path) -> list[str]:
    path = root / ".hydra" / "overrides.yaml"
    if path.is_file():
        return list(yaml.safe_load(path.read_text()) or [])
    try:
        from hydra.core.hydra_config import HydraConfig

        return list(OmegaConf.to_container(HydraConfig.get().overrides.task, resolve=False))
    except ValueError:
        return []


def _resume_path(cfg: DictConfig, root: Path) -> Path | None:
    if cfg.get("ckpt_path"):
        return Path(cfg.ckpt_path)
    own = root / "checkpoints" / ENSEMBLE_CKPT
    if str(cfg.get("resume", "off")) == "auto" and own.is_file():
        return own
    return None


def train_ensemble(cfg: DictConfig, record: Any = None) -> tuple[dict[str, float], dict[str, Any]]:
    """Train the ensemble of ``cfg.ensemble``; the run's metrics are the members' means."""
    members = check_ensemble(cfg)
    log.info(
        f"Ensemble of {len(members)} {cfg.model._target_} members, seeds "
        f"{[m.seed for m in members]}"
    )
    fabric = launch(cfg, len(members))
    run = EnsembleRun(cfg, members, fabric)
    if record is not None:
        record.trainer = _RecordView(run)
    resume = _resume_path(cfg, run.root)
    if resume is not None:
        run.resume_from(resume)
    try:
        if cfg.get("train", True):
            run.fit()
        if cfg.get("test"):
            run.evaluate("test")
        run.save()
    except BaseException as error:
        # a stop signal saved at a step boundary (fit); a second one, or one outside fit,
        # keeps the last checkpoint: resume=auto continues from there
        interrupted = isinstance(error, KeyboardInterrupt | TrainingInterrupted)
        run.write_members("interrupted" if interrupted else "failed", error)
        raise
    run.write_members("completed")
    logged = gather_to_all(run.last_logged)  # every member's, from every rank
    keys = {key for member in logged for key in member}
    metrics = {
        key: float(torch.tensor([m[key] for m in logged if key in m]).mean())
        for key in sorted(keys)
    }
    metrics["ensemble/members_alive"] = float(sum(gather_to_all(run.ensemble.alive.tolist())))
    return metrics, {"cfg": cfg, "ensemble": run}
