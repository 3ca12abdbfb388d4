"""Encode an image dataset once with a frozen first stage (latent caching, LFM spec §8).

    python -m latentzoo.cache_latents data=celeba256 model/autoencoder=sd_vae out=/data/c256_sd

Every image **and its horizontal flip** is encoded; the posterior mean and std are stored in
float16 shards of memory-mapped ``.npy`` plus labels and a ``manifest.json`` (format in
``latentzoo.data.latents``). Train from it with ``data=latents data.path=<out>``.
Resumable: finished shards are kept and encoding continues after them; a cache written with
another autoencoder or data config is refused (``overwrite=true`` replaces it).
The datamodule should yield un-augmented images (flips are added here).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset
from tqdm.auto import tqdm

from latentzoo.data.latents import FORMAT, MANIFEST
from latentzoo.models.autoencoders.base import FirstStage
from latentzoo.paths import config_dir, setup_project_root
from latentzoo.utils.atomic import atomic_write, atomic_write_text, remove_stale_temp_files
from latentzoo.utils.distributed import instantiate_datamodule
from latentzoo.utils.entry import run_hydra_task
from latentzoo.utils.errors import LatentzooError

log = logging.getLogger(__name__)


def _split_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(batch, dict):
        images = batch.get("image", batch.get("images"))
        labels = batch.get("label", batch.get("labels"))
    elif isinstance(batch, list | tuple):
        images, labels = batch[0], batch[1] if len(batch) > 1 else None
    else:
        images, labels = batch, None
    if labels is None or labels.dim() != 1:  # unlabelled, or factor tables: not class labels
        labels = torch.zeros(images.shape[0], dtype=torch.long)
    return images, labels


def training_images(datamodule: Any) -> Dataset | Iterable:
    """The datamodule's training split as a dataset (image datamodules name it differently),
    else its train dataloader (whose order, shuffling and drop_last then apply)."""
    datamodule.setup("fit")
    for name in ("train_dataset", "data_train", "dataset_train", "train_set"):
        if getattr(datamodule, name, None) is not None:
            return getattr(datamodule, name)
    log.warning(
        f"{type(datamodule).__name__} exposes no train_dataset; encoding its train_dataloader() "
        "(shuffled/dropped items follow the datamodule)"
    )
    return datamodule.train_dataloader()


@torch.no_grad()
def cache_latents(
    dataset: Dataset | Iterable,
    autoencoder: FirstStage,
    out: str | Path,
    image_shape: list[int],
    num_classes: int | None = 0,
    key: str = "",
    batch_size: int = 64,
    shard_size: int = 4096,
    num_workers: int = 0,
    limit: int | None = None,
    overwrite: bool = False,
    device: str = "auto",
) -> dict[str, Any]:
    """Encode ``dataset`` (items ``(image in [0, 1], label)``) into shards under ``out``."""
    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(out)  # left by a killed run
    dev = torch.device(
        "cuda"
        if device == "auto" and torch.cuda.is_available()
        else ("cpu" if device == "auto" else device)
    )
    autoencoder = autoencoder.to(dev).freeze()
    describe = autoencoder.describe()
    key = hashlib.sha256(json.dumps([describe, key], sort_keys=True).encode()).hexdigest()[:16]
    manifest_file = out / MANIFEST
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "key": key,
        "autoencoder": describe,
        "image_shape": list(image_shape),
        "latent_shape": autoencoder.latent_shape(image_shape),
        "num_classes": num_classes or 0,
        "flips": True,
        "dtype": "float16",
        "shards": [],
        "count": 0,
        "complete": False,
    }
    if manifest_file.is_file():
        old = json.loads(manifest_file.read_text())
        if old.get("key") != key and not overwrite:
            raise LatentzooError(
                f"'{out}' holds latents of another autoencoder/data config "
                f"({old.get('autoencoder', {}).get('name')}); "
                "choose another out= or pass overwrite=true"
            )
        if old.get("key") == key:
            if old.get("complete"):
                log.info(f"latent cache at {out} is complete ({old['count']} items); nothing to do")
                return old
            manifest["shards"] = old["shards"]  # resume after the finished shards
        else:
            for f in out.glob("shard_*.npy"):
                f.unlink()
    done = sum(s["count"] for s in manifest["shards"])
    is_loader = isinstance(dataset, DataLoader)
    streaming = is_loader or isinstance(dataset, IterableDataset)
    total = None if streaming else len(dataset)
    if limit is not None:
        total = min(limit, total) if total is not None else limit
    if done:
        if streaming:
            raise LatentzooError("cannot resume an iterable dataset; pass overwrite=true")
        log.info(f"resuming after {done} cached items")
    if is_loader:
        loader = dataset
    else:
        if not streaming:
            dataset = Subset(dataset, range(done, total))
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    buffers: dict[str, list[np.ndarray]] = {"mean": [], "std": [], "label": []}
    count = done

    def flush() -> None:
        n = sum(len(b) for b in buffers["label"])
        if not n:
            return
        name = f"shard_{len(manifest['shards']):05d}"
        for part, chunks in buffers.items():
            with atomic_write(out / f"{name}.{part}.npy") as file:  # listed only once complete
                np.save(file, np.concatenate(chunks))
            chunks.clear()
        manifest["shards"].append({"name": name, "count": n})
        manifest["count"] = sum(s["count"] for s in manifest["shards"])
        atomic_write_text(manifest_file, json.dumps(manifest, indent=2))

    with tqdm(total=total, initial=done, desc="encoding latents", unit="img") as bar:
        for batch in loader:
            images, labels = _split_batch(batch)
            if limit is not None and count >= limit:
                break
            if limit is not None:
                images, labels = images[: limit - count], labels[: limit - count]
            x = images.to(dev).float() * 2 - 1
            x = torch.cat([x, x.flip(-1)])  # image and its horizontal flip in one pass
            mean, std = autoencoder.encode(x)
            b = images.shape[0]
            buffers["mean"].append(torch.stack([mean[:b], mean[b:]], 1).half().cpu().numpy())
            buffers["std"].append(torch.stack([std[:b], std[b:]], 1).half().cpu().numpy())
            buffers["label"].append(labels.long().cpu().numpy())
            count += b
            bar.update(b)
            if sum(len(x) for x in buffers["label"]) >= shard_size:
                flush()
    flush()
    manifest["complete"] = True
    manifest["count"] = sum(s["count"] for s in manifest["shards"])
    atomic_write_text(manifest_file, json.dumps(manifest, indent=2))
    log.info(f"cached {manifest['count']} items (+ flips) to {out}")
    return manifest


def run(cfg: DictConfig) -> dict[str, Any]:
    if OmegaConf.is_missing(cfg, "out"):
        raise LatentzooError("cache_latents needs an output folder: out=<folder>")
    datamodule = instantiate_datamodule(cfg.data)
    autoencoder: FirstStage = hydra.utils.instantiate(cfg.model.autoencoder)
    flip = getattr(datamodule, "random_flip", None) or getattr(datamodule, "hflip", None)
    if flip:
        log.warning(
            "the datamodule flips images at random; caching adds flips itself, so turn it off"
        )
    data_cfg = OmegaConf.to_container(cfg.data, resolve=True)
    return cache_latents(
        training_images(datamodule),
        autoencoder,
        cfg.out,
        image_shape=list(datamodule.image_shape),
        num_classes=getattr(datamodule, "num_classes", 0),
        key=json.dumps(data_cfg, sort_keys=True, default=str),
        batch_size=cfg.batch_size,
        shard_size=cfg.shard_size,
        num_workers=cfg.num_workers,
        limit=cfg.limit,
        overwrite=cfg.overwrite,
        device=cfg.device,
    )


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="cache_latents.yaml")
def _hydra_main(cfg: DictConfig) -> None:
    run_hydra_task(run, cfg)


def main() -> None:
    setup_project_root()
    _hydra_main()


if __name__ == "__main__":
    main()
