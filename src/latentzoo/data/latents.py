"""Train latent models from pre-encoded latents (``python -m latentzoo.cache_latents``).

Cache format ``latentzoo-latents-v2`` (a folder). Item i is image i of the source split, in the
source dataset's order; shard k holds items ``[k·S, min((k+1)·S, N))`` (S = ``shard_size``):

    manifest.json
    shard_00000.image.mean.npy   float16 (n, C, h, w)  posterior mean of the images as they are
    shard_00000.image.std.npy    float16 (n, C, h, w)  posterior std (unscaled)
    shard_00000.flip.mean.npy    float16 (n, C, h, w)  the same for each image's horizontal flip
    shard_00000.flip.std.npy     float16 (n, C, h, w)  (only when the cache has ``flips: true``)
    shard_00000.label.npy        int64   (n,)

The two orientations are stored apart (row j of ``image.*`` and of ``flip.*`` are the same image).
The manifest records ``count`` (N) and ``counts`` per orientation, ``shard_size``, ``flips``, the
encoding ``precision``, the first stage (``autoencoder``: ``FirstStage.describe()``, with
``scale_factor`` and the weight ``fingerprint``), ``image_shape``, ``latent_shape``,
``num_classes``, the ``source`` (``data``: the resolved data config with its ``_target_``,
``split``, ``info``: the source's ``reference_info``) and a ``key`` hashing what the latents
depend on. A cache is readable once ``complete`` is true.

At every access the dataset picks the flipped orientation with p = ``flip_p`` and draws a fresh
z = scale_factor · (μ + σ·ε) (LFM's latent dataset; not fast-DiT's single frozen sample), or
z = scale_factor · μ with ``sample: false``. In training the flip and ε come from the resumable
loader's per-batch RNG (``data.resumable``); validation items are seeded by their index, so the
validation loss is the same in every run. Batches are ``{"latent": z (float32), "label": y}``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, Dataset, Subset

from latentzoo.utils.errors import LatentzooError

MANIFEST = "manifest.json"
FORMAT = "latentzoo-latents-v2"
ORIENTATIONS = ("image", "flip")


def shard_parts(flips: bool) -> list[str]:
    """The file parts of one shard (``shard_00000.<part>.npy``)."""
    kept = ORIENTATIONS if flips else ORIENTATIONS[:1]
    return [f"{o}.{m}" for o in kept for m in ("mean", "std")] + ["label"]


def shard_file(folder: str | Path, shard: int, part: str) -> Path:
    return Path(folder) / f"shard_{shard:05d}.{part}.npy"


def shard_range(shard: int, shard_size: int, count: int) -> range:
    """The item indices of ``shard``."""
    return range(shard * shard_size, min((shard + 1) * shard_size, count))


def num_shards(count: int, shard_size: int) -> int:
    return -(-count // shard_size)


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of the complete cache at ``path`` (one-line error otherwise)."""
    file = Path(path).expanduser() / MANIFEST
    if not file.is_file():
        raise LatentzooError(
            f"no latent cache at '{path}' ({MANIFEST} missing). Make one with: python -m "
            "latentzoo.cache_latents data=<image data> model/autoencoder=<first stage> out=<folder>"
        )
    manifest = json.loads(file.read_text())
    if manifest.get("format") != FORMAT:
        raise LatentzooError(
            f"latent cache '{path}' has format {manifest.get('format')!r}, not {FORMAT!r}; "
            "re-encode it with python -m latentzoo.cache_latents ... overwrite=true"
        )
    if not manifest.get("complete", False):
        raise LatentzooError(
            f"latent cache '{path}' is incomplete; rerun the same cache_latents command to "
            "finish it"
        )
    return manifest


class LatentDataset(Dataset):
    """Map-style dataset over the cache's shards (memory-mapped; workers share the pages).

    ``seed``: when given, item i's flip and ε come from a generator seeded by (seed, i) (fixed
    validation draws); otherwise from the global torch RNG (the training loader seeds it per
    batch).
    """

    def __init__(
        self,
        path: str | Path,
        flip_p: float = 0.5,
        sample: bool = True,
        seed: int | None = None,
    ) -> None:
        self.path = Path(path).expanduser()
        self.manifest = read_manifest(self.path)
        self.scale = float(self.manifest["autoencoder"]["scale_factor"])
        self.flips = bool(self.manifest["flips"])
        if flip_p > 0 and not self.flips:
            raise LatentzooError(
                f"data.flip_p={flip_p} but the cache at '{path}' holds no flips (cached with "
                "flips=false); set data.flip_p=0 or re-encode with flips=true"
            )
        self.flip_p, self.sample, self.seed = flip_p, sample, seed
        self.count = int(self.manifest["count"])
        self.shard_size = int(self.manifest["shard_size"])
        self._arrays: dict[tuple[int, str], np.ndarray] = {}

    def __len__(self) -> int:
        return self.count

    def _array(self, shard: int, part: str) -> np.ndarray:
        if (shard, part) not in self._arrays:  # opened lazily, once per worker
            file = shard_file(self.path, shard, part)
            self._arrays[shard, part] = np.load(file, mmap_mode="r")
        return self._arrays[shard, part]

    def raw(self, index: int, orientation: str = "image") -> tuple[np.ndarray, np.ndarray, int]:
        """(mean, std) (C, h, w) of item ``index`` as ``image`` or ``flip``, and its label."""
        if not 0 <= index < self.count:
            raise IndexError(index)
        shard, j = divmod(index, self.shard_size)
        mean = self._array(shard, f"{orientation}.mean")[j]
        std = self._array(shard, f"{orientation}.std")[j]
        return mean, std, int(self._array(shard, "label")[j])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        gen = None
        if self.seed is not None:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        flip = self.flip_p > 0 and float(torch.rand((), generator=gen)) < self.flip_p
        mean, std, label = self.raw(index, "flip" if flip else "image")
        z = torch.from_numpy(np.asarray(mean, dtype=np.float32))
        if self.sample:
            sigma = torch.from_numpy(np.asarray(std, dtype=np.float32))
            z = z + sigma * torch.randn(sigma.shape, generator=gen)
        return {"latent": z * self.scale, "label": torch.tensor(label, dtype=torch.long)}


class LatentsDataModule(L.LightningDataModule):
    """Latent cache -> batches of ``{"latent", "label"}``.

    Validation: ``val_path`` (a cache of the source's val split: ``cache_latents split=val``),
    then training uses every cached item; without it the last ``val_size`` items validate and
    are left out of training. ``image_shape`` and ``num_classes`` are given in the config (models
    read them by interpolation) and checked against the manifest. ``reference_dataloader`` /
    ``reference_info`` are those of the source image datamodule, rebuilt from the manifest, so
    FID reference statistics come from the images the latents were encoded from.
    """

    def __init__(
        self,
        path: str,
        image_shape: list[int] | None = None,
        num_classes: int | None = None,
        batch_size: int = 32,
        val_size: int = 256,
        val_path: str | None = None,
        flip_p: float = 0.5,
        sample: bool = True,
        num_workers: int = 0,
        pin_memory: bool = False,
    ) -> None:
        super().__init__()
        self.path, self.val_path = path, val_path
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
        if val_path is not None:
            val = read_manifest(val_path)
            if val["key_autoencoder"] != self.manifest["key_autoencoder"]:
                raise LatentzooError(
                    f"data.val_path='{val_path}' was encoded by another first stage or precision "
                    f"than data.path='{path}'; encode both with the same cache_latents settings"
                )
        self.batch_size, self.val_size, self.flip_p = batch_size, val_size, flip_p
        self.sample = sample
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self._source: Any = None

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
        full = LatentDataset(self.path, self.flip_p, self.sample)
        if self.val_path is not None:
            self.train_dataset: Dataset = full
            self.val_dataset: Dataset = LatentDataset(self.val_path, self.flip_p, self.sample, 0)
            return
        n = len(full)
        val = min(self.val_size, n // 2)
        self.train_dataset = Subset(full, range(n - val))
        fixed = LatentDataset(self.path, self.flip_p, self.sample, seed=0)
        self.val_dataset = Subset(fixed, range(n - val, n))

    def train_dataloader(self) -> DataLoader:
        from latentzoo.data.resumable import resumable_loader

        # the flip and ε of every item are seeded per batch by (seed, epoch, rank, batch)
        return resumable_loader(
            self.train_dataset,
            self.batch_size,
            drop_last=len(self.train_dataset) >= self.batch_size,  # type: ignore[arg-type]
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(
            self.val_dataset,
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
        )

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    # ---------------------------------------------------------------- FID reference (source images)

    def source_datamodule(self) -> Any:
        """The image datamodule the latents were encoded from (rebuilt from the manifest)."""
        if self._source is None:
            from latentzoo.utils.distributed import instantiate_datamodule

            data = self.manifest["source"]["data"]
            try:
                self._source = instantiate_datamodule(OmegaConf.create(data))
            except Exception as error:
                raise self._no_source(error) from error
        return self._source

    def _no_source(self, error: BaseException) -> LatentzooError:
        target = self.manifest["source"]["data"].get("_target_", "?")
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        return LatentzooError(
            f"cannot rebuild the source images of the latent cache at '{self.path}' ({target}: "
            f"{reason}); pass metrics.fid.reference_path=<reference stats .npz> instead"
        )

    def _source_split(self, split: str) -> str:
        """``train`` is the split the latents were encoded from; other splits keep their name."""
        return self.manifest["source"]["split"] if split == "train" else split

    def reference_dataloader(
        self, split: str = "train", batch_size: int = 100, rank: int = 0, world_size: int = 1
    ) -> Any:
        """The source image datamodule's ordered, un-augmented pass over ``split``."""
        source = self.source_datamodule()
        try:
            return source.reference_dataloader(
                self._source_split(split), batch_size=batch_size, rank=rank, world_size=world_size
            )
        except Exception as error:
            raise self._no_source(error) from error

    def reference_info(self, split: str = "train") -> dict[str, Any]:
        """The source's description of ``split`` (keys the FID reference-statistics cache)."""
        source = self.source_datamodule()
        try:
            return source.reference_info(self._source_split(split))
        except Exception as error:
            raise self._no_source(error) from error
