"""Encode an image split once with a frozen first stage (latent caching, LFM spec §8).

    python -m latentzoo.cache_latents data=celebahq256 model/autoencoder=sd_vae out=/data/c256_sd
    python -m latentzoo.cache_latents ... split=val out=/data/c256_sd_val   # a validation cache
    torchrun --nproc_per_node 8 -m latentzoo.cache_latents ...              # or trainer=ddp

Every image of ``split`` is encoded exactly once, in the dataset's order and un-augmented (the
datamodule's ``reference_dataset(split)``), and, with ``flips: true``, its horizontal flip,
stored apart; the posterior mean and std go to float16 shards of ``.npy`` plus labels and a
``manifest.json`` (format: ``latentzoo.data.latents``). Train with ``data=latents
data.path=<out>``.

* **Precision**: ``precision: fp32`` (default, as LFM) or ``bf16`` (autocast; faster on GPUs,
  latents differ from fp32 by bf16 rounding). Stored values are float16 either way.
* **Resume**: shard files are written atomically; a rerun of the same command encodes only the
  missing shards (an interrupted run loses at most one shard per process). A folder holding a
  cache of another autoencoder / data / split / precision is refused; ``overwrite=true``
  discards what the folder holds and encodes anew.
* **Processes**: under torchrun (``RANK`` / ``WORLD_SIZE``) or with ``trainer=ddp`` /
  ``trainer=ddp_sim`` (Lightning Fabric with the trainer's accelerator, devices and strategy),
  rank r encodes the r-th contiguous block of shards; rank 0 writes the final manifest once every
  rank has finished. Shards depend only on ``shard_size`` and ``batch_size``, so the files equal
  those of a one-process run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from latentzoo.data.images import ImageCollate
from latentzoo.data.latents import (
    FORMAT,
    MANIFEST,
    num_shards,
    shard_file,
    shard_parts,
    shard_range,
)
from latentzoo.models.autoencoders.base import FirstStage
from latentzoo.paths import config_dir, setup_project_root
from latentzoo.utils.atomic import atomic_write, atomic_write_text, remove_stale_temp_files
from latentzoo.utils.distributed import instantiate_datamodule
from latentzoo.utils.entry import run_hydra_task
from latentzoo.utils.errors import LatentzooError
from latentzoo.utils.validation import (
    AT_LEAST_1,
    NON_NEGATIVE,
    Choice,
    check_values,
    validate_config,
)

log = logging.getLogger(__name__)

PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16}
# data config entries that change how images are loaded, never which pixels: left out of the key
LOADER_KEYS = ("batch_size", "global_batch_size", "num_workers", "pin_memory", "flip", "augment")


def _hash(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def source_dataset(datamodule: Any, split: str) -> Dataset:
    """``split`` of an image datamodule in order and un-augmented (``reference_dataset``)."""
    if not hasattr(datamodule, "reference_dataset"):
        raise LatentzooError(
            f"{type(datamodule).__name__} has no reference_dataset(split) (the in-order, "
            "un-augmented images of a split); cache an image datamodule (image_folder, lmdb, "
            "proc_blobs, celebahq256, ...)"
        )
    try:
        return datamodule.reference_dataset(split)
    except KeyError:
        raise LatentzooError(f"the data has no split {split!r}; use split=train|val|test") from None


def _shards_of(rank: int, world_size: int, shards: int) -> range:
    """Rank ``rank``'s contiguous block of shard numbers (sizes differ by at most one)."""
    return range(rank * shards // world_size, (rank + 1) * shards // world_size)


def _shard_done(out: Path, shard: int, flips: bool) -> bool:
    return all(shard_file(out, shard, part).is_file() for part in shard_parts(flips))


def _labels(labels: torch.Tensor) -> torch.Tensor:
    if labels.dim() != 1:  # factor tables and other non-class targets
        return torch.zeros(labels.shape[0], dtype=torch.long)
    return labels.long()


@torch.no_grad()
def _encode_shard(
    dataset: Dataset,
    indices: range,
    autoencoder: FirstStage,
    flips: bool,
    autocast_dtype: torch.dtype | None,
    batch_size: int,
    num_workers: int,
    device: torch.device,
    bar: tqdm,
) -> dict[str, np.ndarray]:
    """The mean/std of ``indices`` (and of their flips) and their labels, as shard parts."""
    loader = DataLoader(
        Subset(dataset, indices),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=ImageCollate(flip=False),
    )
    chunks: dict[str, list[np.ndarray]] = {part: [] for part in shard_parts(flips)}
    for images, labels in loader:
        x = images.to(device).float() * 2 - 1
        views = {"image": x, "flip": x.flip(-1)} if flips else {"image": x}
        for orientation, view in views.items():
            with torch.autocast(device.type, autocast_dtype, enabled=autocast_dtype is not None):
                mean, std = autoencoder.encode(view)
            chunks[f"{orientation}.mean"].append(mean.float().half().cpu().numpy())
            chunks[f"{orientation}.std"].append(std.float().half().cpu().numpy())
        chunks["label"].append(_labels(labels).numpy())
        bar.update(images.shape[0])
    return {part: np.concatenate(arrays) for part, arrays in chunks.items()}


def cache_latents(
    dataset: Dataset,
    autoencoder: FirstStage,
    out: str | Path,
    image_shape: list[int],
    num_classes: int | None = 0,
    source: dict[str, Any] | None = None,
    flips: bool = True,
    precision: str = "fp32",
    batch_size: int = 64,
    shard_size: int = 4096,
    num_workers: int = 0,
    limit: int | None = None,
    overwrite: bool = False,
    device: str | torch.device = "cpu",
    rank: int = 0,
    world_size: int = 1,
    barrier: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Encode map-style ``dataset`` (items ``(image, label)``, image uint8 or float in [0, 1])
    into the cache folder ``out``; this process does rank ``rank``'s shards of ``world_size``.
    ``barrier`` synchronises the ranks (required when ``world_size > 1``). Returns the manifest.
    """
    if precision not in PRECISIONS:
        raise LatentzooError(f"precision={precision!r} is not one of {', '.join(PRECISIONS)}")
    if world_size > 1 and barrier is None:
        raise ValueError("cache_latents over several ranks needs a barrier")
    barrier = barrier or (lambda: None)
    out = Path(out).expanduser().resolve()
    device = torch.device(device)
    autoencoder = autoencoder.to(device).freeze()
    count = len(dataset)  # type: ignore[arg-type]
    count = count if limit is None else min(limit, count)
    if count < 1:
        raise LatentzooError("the split to cache holds no images")
    source = source or {}
    describe = autoencoder.describe()
    key_autoencoder = _hash([FORMAT, describe, list(image_shape), precision])
    data_key = {k: v for k, v in (source.get("data") or {}).items() if k not in LOADER_KEYS}
    key = _hash([key_autoencoder, data_key, source.get("split"), flips, shard_size, count])
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "key": key,
        "key_autoencoder": key_autoencoder,
        "complete": False,
        "count": count,
        "counts": {"image": count, "flip": count if flips else 0},
        "shard_size": shard_size,
        "num_shards": num_shards(count, shard_size),
        "flips": flips,
        "precision": precision,
        "dtype": "float16",
        "autoencoder": describe,
        "image_shape": list(image_shape),
        "latent_shape": autoencoder.latent_shape(image_shape),
        "num_classes": num_classes or 0,
        "source": source,
    }
    manifest_file = out / MANIFEST
    old = json.loads(manifest_file.read_text()) if manifest_file.is_file() else None
    if old is not None and not overwrite:
        if old.get("key") != key:
            raise LatentzooError(
                f"'{out}' holds a latent cache of another autoencoder/data/split/precision "
                f"({(old.get('autoencoder') or {}).get('name')}, "
                f"{(old.get('source') or {}).get('split')}); choose another out= or pass "
                "overwrite=true"
            )
        if old.get("complete"):
            log.info(f"latent cache at {out} is complete ({old['count']} items); nothing to do")
            return old
    if rank == 0:  # the others wait at the barrier below
        out.mkdir(parents=True, exist_ok=True)
        remove_stale_temp_files(out)  # left by a killed run
        if old is None or overwrite:
            for file in out.glob("shard_*.npy"):
                file.unlink()
            atomic_write_text(manifest_file, json.dumps(manifest, indent=2))
    barrier()

    mine = list(_shards_of(rank, world_size, manifest["num_shards"]))
    if world_size > 1:
        block = f"{mine[0]}..{mine[-1]}" if mine else "none"
        log.info(f"rank {rank}/{world_size} encodes shards {block}")
    todo = [k for k in mine if not _shard_done(out, k, flips)]
    total = sum(len(shard_range(k, shard_size, count)) for k in mine)
    left = sum(len(shard_range(k, shard_size, count)) for k in todo)
    if left < total:
        log.info(f"rank {rank}: resuming, {total - left} of {total} items already cached")
    autocast_dtype = PRECISIONS[precision]
    with tqdm(
        total=total, initial=total - left, desc="encoding", unit="img", disable=rank != 0
    ) as bar:
        for k in todo:
            parts = _encode_shard(
                dataset,
                shard_range(k, shard_size, count),
                autoencoder,
                flips,
                autocast_dtype,
                batch_size,
                num_workers,
                device,
                bar,
            )
            for part, array in parts.items():  # each file atomic; the shard counts once all are
                with atomic_write(shard_file(out, k, part)) as file:
                    np.save(file, array)
    barrier()
    if rank == 0:
        missing = [k for k in range(manifest["num_shards"]) if not _shard_done(out, k, flips)]
        if missing:
            raise LatentzooError(
                f"shards {missing[:5]} of '{out}' are missing after all ranks finished; rerun "
                "the same command to encode them"
            )
        manifest["complete"] = True
        atomic_write_text(manifest_file, json.dumps(manifest, indent=2))
        log.info(f"cached {count} images{' + flips' if flips else ''} to {out}")
    barrier()
    manifest["complete"] = True
    return manifest


# ------------------------------------------------------------------------------ command line


def make_fabric(cfg: DictConfig) -> Any:
    """Fabric for the processes: the ``trainer`` config's, torchrun's, or one process."""
    from lightning.fabric import Fabric

    accelerator = {"auto": "auto", "cpu": "cpu", "cuda": "cuda", "gpu": "cuda"}.get(
        str(cfg.device), str(cfg.device)
    )
    trainer = cfg.get("trainer")
    world = int(os.environ.get("WORLD_SIZE", 1))
    if trainer is not None:
        strategy = str(trainer.get("strategy", "auto"))
        return Fabric(
            accelerator=trainer.get("accelerator", accelerator),
            devices=trainer.get("devices", 1),
            num_nodes=trainer.get("num_nodes", 1),
            strategy="ddp" if "ddp" in strategy or "fsdp" in strategy else strategy,
        )
    if world > 1:  # torchrun: one process per device, already started
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        return Fabric(
            accelerator=accelerator, devices=local, num_nodes=world // local, strategy="ddp"
        )
    return Fabric(accelerator=accelerator, devices=1)


def _encode_task(fabric: Any, cfg: DictConfig) -> dict[str, Any]:
    datamodule = instantiate_datamodule(cfg.data.copy())
    dataset = source_dataset(datamodule, cfg.split)
    torch.manual_seed(cfg.seed)  # a first stage without trained weights is the same every run
    autoencoder: FirstStage = hydra.utils.instantiate(cfg.model.autoencoder)
    data = OmegaConf.to_container(cfg.data, resolve=True)
    source = {"data": data, "split": cfg.split}
    if hasattr(datamodule, "reference_info"):
        source["info"] = datamodule.reference_info(cfg.split)
    return cache_latents(
        dataset,
        autoencoder,
        cfg.out,
        image_shape=list(datamodule.image_shape),
        num_classes=getattr(datamodule, "num_classes", 0),
        source=source,
        flips=cfg.flips,
        precision=cfg.precision,
        batch_size=cfg.batch_size,
        shard_size=cfg.shard_size,
        num_workers=cfg.num_workers,
        limit=cfg.limit,
        overwrite=cfg.overwrite,
        device=fabric.device,
        rank=fabric.global_rank,
        world_size=fabric.world_size,
        barrier=fabric.barrier,
    )


CACHE_RULES = {
    "batch_size": AT_LEAST_1,
    "shard_size": AT_LEAST_1,
    "num_workers": NON_NEGATIVE,
    "limit": AT_LEAST_1,
    "split": Choice(("train", "val", "test")),
    "device": Choice(("auto", "cpu", "cuda")),
}


def run(cfg: DictConfig) -> dict[str, Any]:
    if OmegaConf.is_missing(cfg, "out"):
        raise LatentzooError("cache_latents needs an output folder: out=<folder>")
    if cfg.precision not in PRECISIONS:
        raise LatentzooError(f"precision={cfg.precision!r} is not one of {', '.join(PRECISIONS)}")
    check_values(cfg, CACHE_RULES)
    validate_config(cfg)  # data, model/autoencoder, trainer: before anything is encoded
    fabric = make_fabric(cfg)
    return fabric.launch(_encode_task, cfg)


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="cache_latents.yaml")
def _hydra_main(cfg: DictConfig) -> None:
    run_hydra_task(run, cfg)


def main() -> None:
    setup_project_root()
    _hydra_main()


if __name__ == "__main__":
    main()
