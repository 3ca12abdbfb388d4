"""DataModule for ground-truth factor datasets (procedural or real dSprites, 3D Shapes, ...)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from latentzoo.data.datasets.factors import FactorDataset
from latentzoo.data.resumable import resumable_loader
from latentzoo.utils.errors import LatentzooError


class FactorSubset(Dataset):
    """A fixed set of indices into a :class:`FactorDataset`, fetched a whole batch at a time.

    ``__getitems__`` lets the DataLoader hand over all indices of a batch at once, so the
    images of a batch are rendered/gathered in one vectorised call instead of per item.
    """

    def __init__(
        self, dataset: FactorDataset, indices: np.ndarray, factors_only: bool = False
    ) -> None:
        self.dataset = dataset
        self.indices = np.asarray(indices, dtype=np.int64)
        self.factors_only = factors_only  # (None, factors): images rendered after transfer

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.dataset[int(self.indices[i])]

    def __getitems__(self, items: Sequence[int]) -> tuple[torch.Tensor | None, torch.Tensor]:
        grid = self.indices[np.asarray(items, dtype=np.int64)]
        if self.factors_only:
            return None, torch.from_numpy(self.dataset.factors_of(grid))
        return self.dataset.get_batch(grid)


def _already_batched(batch: Any) -> Any:
    return batch


class GroundTruthDataModule(L.LightningDataModule):
    """Disjoint train/val/test splits of a factor dataset by a permutation of its indices.

    Batches are ``(images float [B, C, H, W] in [0, 1], factor classes int64 [B, K])``.
    ``dataset`` exposes the factors to metrics (names, sizes, ``sample_factors``, ``images_of``).

    ``split_seed`` fixes the splits (it defines the dataset, not the sampling); ``seed`` seeds
    the training order and is the run seed when null. ``val_size=0`` is a protocol without
    validation (dlib, CLG-VAE: train on everything, keep the final weights): there is then no
    val split, and ``val_dataloader`` serves the first ``batch_size`` training images only for
    the image-grid callbacks (run with ``trainer.limit_val_batches=0``, as those experiments do).

    ``prefetch``: with ``num_workers=0``, training batches are rendered/gathered this many
    batches ahead in a background thread, off the training step's critical path (the same
    batches in the same order; data.resumable). ``num_workers > 0`` uses worker processes
    instead (persistent, each ``prefetch_factor`` batches ahead).

    ``render_on_device`` (procedural sets with ``images_on_device``, e.g. proc_dsprites): the
    training loader yields only the factor classes; after Lightning moves them to the model's
    device, ``on_after_batch_transfer`` renders the images there (on a GPU: no host rendering,
    no image transfer). The same renderer and tables, so the same images as on the CPU.
    """

    def __init__(
        self,
        dataset: FactorDataset,
        image_shape: Sequence[int],
        batch_size: int = 64,
        val_size: int = 4096,
        test_size: int = 4096,
        split_seed: int = 0,
        seed: int | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        prefetch: int = 2,
        render_on_device: bool = False,
    ) -> None:
        super().__init__()
        if tuple(image_shape) != tuple(dataset.image_shape):
            raise ValueError(
                f"data.image_shape={list(image_shape)} does not match the dataset's images "
                f"{list(dataset.image_shape)}"
            )
        if min(val_size, test_size) < 0 or val_size + test_size >= len(dataset):
            raise ValueError(
                f"data.val_size and data.test_size must be >= 0, their sum "
                f"({val_size + test_size}) smaller than the dataset ({len(dataset)} images)"
            )
        self.dataset = dataset
        self.image_shape = tuple(image_shape)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.prefetch = int(prefetch)
        if render_on_device and not hasattr(dataset, "images_on_device"):
            raise LatentzooError(
                f"data.render_on_device=true needs a procedural dataset that renders on the "
                f"model's device (proc_dsprites); {type(dataset).__name__} cannot: set it false"
            )
        self.render_on_device = bool(render_on_device)
        self.seed = seed
        order = np.random.default_rng(split_seed).permutation(len(dataset))
        self.splits = {
            "val": order[:val_size],
            "test": order[val_size : val_size + test_size],
            "train": order[val_size + test_size :],
        }
        if val_size == 0:  # no validation split: a preview batch of training images for grids
            self.splits["val"] = self.splits["train"][:batch_size]

    @property
    def factor_names(self) -> tuple[str, ...]:
        return tuple(self.dataset.factor_names)

    @property
    def factor_sizes(self) -> tuple[int, ...]:
        return tuple(self.dataset.factor_sizes)

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        return DataLoader(
            FactorSubset(self.dataset, self.splits[split]),
            batch_size=self.batch_size,
            shuffle=shuffle,
            drop_last=shuffle,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
            collate_fn=_already_batched,
        )

    def train_dataloader(self) -> DataLoader:
        # seeded order and position: resumes exactly (data.resumable)
        return resumable_loader(
            FactorSubset(self.dataset, self.splits["train"], factors_only=self.render_on_device),
            self.batch_size,
            collate_fn=_already_batched,
            seed=self.seed,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
            prefetch=self.prefetch,
        )

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if isinstance(batch, tuple | list) and len(batch) == 2 and batch[0] is None:
            factors = batch[1]
            return self.dataset.images_on_device(factors), factors
        return batch

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)
