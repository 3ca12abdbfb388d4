"""Train latent models from pre-encoded latents (``python -m latentzoo.cache_latents``).

Cache format (a folder): ``manifest.json`` plus shards of memory-mapped ``.npy`` files

    shard_00000.mean.npy   float16 (N, 2, C, h, w)   posterior mean, [:, 0] image, [:, 1] its flip
    shard_00000.std.npy    float16 (N, 2, C, h, w)   posterior std (unscaled)
    shard_00000.label.npy  int64   (N,)

The manifest records the first stage (``FirstStage.describe()``: name, class, scale factor,
shapes, weight fingerprint), image/latent shapes, ``num_classes``, counts and a key hashing the
autoencoder and data config. At every access the dataset picks the flip with p = 0.5 and draws
a fresh z = scale_factor · (μ + σ·ε) (LFM's latent dataset; not fast-DiT's single frozen sample).
Batches are ``{"latent": z (float32), "label": y (int64)}``.
"""

from __future__ import annotations

import bisect
import json
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from latentzoo.utils.errors import LatentzooError

MANIFEST = "manifest.json"
FORMAT = "latentzoo-latents-v1"


def read_manifest(path: str | Path) -> dict[str, Any]:
    file = Path(path).expanduser() / MANIFEST
    if not file.is_file():
        raise LatentzooError(
            f"no latent cache at '{path}' ({MANIFEST} missing). Make one with: python -m "
            "latentzoo.cache_latents data=<image data> model/autoencoder=<first stage> out=<folder>"
        )
    manifest = json.loads(file.read_text())
    if manifest.get("format") != FORMAT or not manifest.get("complete", False):
        raise LatentzooError(
            f"latent cache '{path}' is incomplete or of another format; rerun cache_latents"
        )
    return manifest


class LatentDataset(Dataset):
    """Map-style dataset over the cache's shards (memory-mapped; workers share the pages)."""

    def __init__(self, path: str | Path, flip_p: float = 0.5, resample: bool = True) -> None:
        self.path = Path(path).expanduser()
        self.manifest = read_manifest(self.path)
        self.scale = float(self.manifest["autoencoder"]["scale_factor"])
        self.flip_p, self.resample = flip_p, resample
        self.shards = [s["name"] for s in self.manifest["shards"]]
        self.offsets = np.cumsum([0] + [s["count"] for s in self.manifest["shards"]]).tolist()
        self._arrays: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def __len__(self) -> int:
        return self.offsets[-1]

    def _shard(self, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if name not in self._arrays:  # opened lazily, once per worker
            self._arrays[name] = tuple(
                np.load(self.path / f"{name}.{part}.npy", mmap_mode="r")
                for part in ("mean", "std", "label")
            )
        return self._arrays[name]

    def raw(self, index: int) -> tuple[np.ndarray, np.ndarray, int]:
        """(mean, std) of both orientations (2, C, h, w) and the label of item ``index``."""
        shard = bisect.bisect_right(self.offsets, index) - 1
        mean, std, label = self._shard(self.shards[shard])
        j = index - self.offsets[shard]
        return mean[j], std[j], int(label[j])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        mean, std, label = self.raw(index)
        flip = int(torch.rand(()) < self.flip_p)
        mu = torch.from_numpy(np.asarray(mean[flip], dtype=np.float32))
        sigma = torch.from_numpy(np.asarray(std[flip], dtype=np.float32))
        z = mu + sigma * torch.randn_like(sigma) if self.resample else mu
        return {"latent": z * self.scale, "label": torch.tensor(label, dtype=torch.long)}


class LatentsDataModule(L.LightningDataModule):
    """Latent cache -> batches of ``{"latent", "label"}``; the last ``val_size`` items validate.

    ``image_shape`` and ``num_classes`` are given in the config (models read them by
    interpolation) and checked against the manifest.
    """

    def __init__(
        self,
        path: str,
        image_shape: list[int] | None = None,
        num_classes: int | None = None,
        batch_size: int = 32,
        val_size: int = 256,
        flip_p: float = 0.5,
        num_workers: int = 0,
        pin_memory: bool = False,
    ) -> None:
        super().__init__()
        self.path = path
        self.manifest = read_manifest(path)
        self.image_shape = list(image_shape or self.manifest["image_shape"])
        self.num_classes = num_classes
        self.latent_shape = self.manifest["latent_shape"]
        if self.image_shape != list(self.manifest["image_shape"]):
            raise LatentzooError(
                f"data.image_shape={self.image_shape} but the cache at '{path}' holds "
                f"{self.manifest['image_shape']} images; set data.image_shape to match"
            )
        cached = self.manifest.get("num_classes") or 0
        if (num_classes or 0) != cached:
            raise LatentzooError(
                f"data.num_classes={num_classes} but the cache at '{path}' has {cached} classes"
            )
        self.batch_size, self.val_size, self.flip_p = batch_size, val_size, flip_p
        self.num_workers, self.pin_memory = num_workers, pin_memory

    def check_autoencoder(self, first_stage: Any) -> None:
        """Refuse latents written by another first stage than the model's."""
        cached, ours = self.manifest["autoencoder"], first_stage.describe()
        same_weights = abs(cached["fingerprint"] - ours["fingerprint"]) <= 1e-6 * max(
            1.0, abs(ours["fingerprint"])
        )
        keys = ("class", "scale_factor", "latent_channels", "downsample")
        if not same_weights or any(cached[k] != ours[k] for k in keys):
            raise LatentzooError(
                f"the latent cache at '{self.path}' was encoded by {cached['name']} "
                f"(scale {cached['scale_factor']}, fingerprint {cached['fingerprint']:.6g}) but "
                "the "
                f"model's autoencoder is {ours['name']} (scale {ours['scale_factor']}, "
                f"fingerprint {ours['fingerprint']:.6g}); re-encode with cache_latents or pick the "
                "matching model/autoencoder"
            )

    def setup(self, stage: str | None = None) -> None:
        if hasattr(self, "train_dataset"):
            return
        full = LatentDataset(self.path, self.flip_p)
        n = len(full)
        val = min(self.val_size, n // 2)
        self.train_dataset = Subset(full, range(n - val))
        self.val_dataset = Subset(full, range(n - val, n))

    def _loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            drop_last=shuffle and len(dataset) >= self.batch_size,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        from latentzoo.data.resumable import resumable_loader

        # the flip and ε of every item are seeded per batch by (seed, epoch, rank, batch)
        return resumable_loader(
            self.train_dataset,
            self.batch_size,
            drop_last=len(self.train_dataset) >= self.batch_size,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_dataset, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.val_dataset, shuffle=False)
