"""DataModules for (optionally labelled) image sets: procedural blobs, image folders and webdataset
shards (CIFAR-10 and the other labelled sets live in :mod:`latentzoo.data.labelled`).

Every loader yields ``(images float32 [B, C, H, W] in [0, 1], labels int64 [B])`` (zeros when
unlabelled); modules expose ``image_shape`` and ``num_classes`` (0 when unlabelled). Datasets
keep uint8 and the collate converts per batch (and applies the random horizontal flip of the
training split). ``reference_dataset(split)`` is a split's images in order and un-augmented (the
latent cache encodes it), ``reference_dataloader(split)`` the ordered pass that FID reference
statistics are computed from, and ``reference_info(split)`` describes it for the stats cache.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from latentzoo.data.bad_samples import BadSampleLog, attach_report, check_mode
from latentzoo.data.datasets.errors import DatasetNotFoundError
from latentzoo.data.datasets.image_folder import ImageFolder, class_labels, list_images
from latentzoo.data.datasets.proc_blobs import ProcBlobs
from latentzoo.data.resumable import resumable_loader
from latentzoo.utils.errors import LatentzooError
from latentzoo.utils.logging import RankedLogger

log = RankedLogger(__name__, rank_zero_only=True)

__all__ = [
    "ImageDataModule",
    "ImageFolderDataModule",
    "ProcBlobsDataModule",
    "WebDatasetDataModule",
]


class ImageCollate:
    """Stack ``(image, label)`` items; uint8 -> float in [0, 1]; flip each image with p = 0.5."""

    def __init__(self, flip: bool) -> None:
        self.flip = flip

    def __call__(self, items: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[Any, ...]:
        images = torch.stack([item[0] for item in items])
        labels = torch.stack([torch.as_tensor(item[1], dtype=torch.int64) for item in items])
        if images.dtype == torch.uint8:
            images = images.float().div_(255)
        if self.flip:
            mask = torch.rand(images.shape[0]) < 0.5
            images[mask] = images[mask].flip(-1)
        return images, labels


class ImageDataModule(L.LightningDataModule):
    """Shared loaders and bookkeeping; subclasses build ``self.datasets`` in :meth:`build`.

    ``batch_size`` is per device (train.py derives it from ``data.global_batch_size``);
    ``seed`` seeds the training order and flips (None: the run seed, so a seed sweep sees
    different batches). ``on_bad_sample``: ``error`` stops at a corrupt file, naming it;
    ``skip`` drops it and reports the count and first paths at the end of each epoch (the
    datasets that read files use ``self.bad_samples[split]``).
    """

    def __init__(
        self,
        name: str,
        image_shape: Sequence[int],
        num_classes: int = 0,
        batch_size: int = 64,
        num_workers: int = 0,
        pin_memory: bool = False,
        flip: bool = True,
        seed: int | None = None,
        on_bad_sample: str = "error",
    ) -> None:
        super().__init__()
        self.name = name
        self.on_bad_sample = check_mode(on_bad_sample)
        self.bad_samples: dict[str, BadSampleLog] = {}
        if self.on_bad_sample == "skip":
            self.bad_samples = {split: BadSampleLog() for split in ("train", "val", "test")}
        self.seed = seed
        self.image_shape = tuple(int(x) for x in image_shape)
        self.num_classes = int(num_classes)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.flip = flip
        self.datasets: dict[str, Dataset] = {}

    @property
    def image_size(self) -> int:
        return self.image_shape[-1]

    def build(self) -> dict[str, Dataset]:
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        if not self.datasets:
            self.datasets = self.build()
        if self.bad_samples:
            attach_report(self, self.bad_samples)

    def _dataset(self, split: str) -> Dataset:
        self.setup()
        return self.datasets[split]

    def _loader(self, dataset: Dataset, train: bool, batch_size: int | None = None) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size or self.batch_size,
            shuffle=train,
            drop_last=train,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0 and train,
            collate_fn=ImageCollate(flip=train and self.flip),
        )

    def train_dataloader(self) -> DataLoader:
        # seeded order, position and flips (per batch, from (seed, epoch, rank, batch)): resumes
        # exactly, with any num_workers (data.resumable)
        return resumable_loader(
            self._dataset("train"),
            self.batch_size,
            collate_fn=ImageCollate(flip=self.flip),
            seed=self.seed,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader:
        return self._loader(self._dataset("val"), train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self._dataset("test"), train=False)

    def reference_dataset(self, split: str = "train") -> Dataset:
        """The images of ``split`` in order and un-augmented (items ``(uint8 image, label)``;
        :class:`ImageCollate` with ``flip=False`` makes batches of them). FID reference
        statistics and the latent cache read this, never the shuffled, flipped train loader."""
        dataset = self._dataset(split)
        without_augment = getattr(dataset, "without_augment", None)  # per-item training transforms
        return without_augment() if without_augment is not None else dataset

    def reference_dataloader(
        self, split: str = "train", batch_size: int = 100, rank: int = 0, world_size: int = 1
    ) -> DataLoader:
        """Ordered, un-augmented pass over ``split`` (this rank's strided shard under DDP)."""
        dataset = self.reference_dataset(split)
        if world_size > 1:
            dataset = Subset(dataset, range(rank, len(dataset), world_size))
        return self._loader(dataset, train=False, batch_size=batch_size)

    def reference_info(self, split: str = "train") -> dict[str, Any]:
        """What the images of ``split`` depend on (keys the FID reference-statistics cache)."""
        info: dict[str, Any] = {
            "dataset": self.name,
            "split": split,
            "image_shape": list(self.image_shape),
        }
        with contextlib.suppress(TypeError):  # iterable datasets have no length
            info["split_size"] = len(self._dataset(split))  # type: ignore[arg-type]
        return info


class ProcBlobsDataModule(ImageDataModule):
    """``proc_blobs`` (datasets.md §11): disjoint index ranges of one procedural stream.
    ``content_seed`` picks the rendered images (it defines the dataset); ``seed`` the sampler's."""

    def __init__(
        self,
        image_size: int = 64,
        num_train: int = 50_000,
        num_val: int = 1000,
        num_test: int = 1000,
        max_blobs: int = 5,
        num_classes: int = 0,
        content_seed: int = 0,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("name", "proc_blobs")
        kwargs.setdefault("image_shape", [3, image_size, image_size])
        super().__init__(num_classes=num_classes, **kwargs)
        if self.image_shape != (3, image_size, image_size):
            raise ValueError(f"data.image_shape={list(self.image_shape)} != [3, {image_size}]*2")
        self.sizes = {"train": num_train, "val": num_val, "test": num_test}
        self.max_blobs = max_blobs
        self.content_seed = content_seed

    def build(self) -> dict[str, Dataset]:
        offsets = {"train": 0, "val": self.sizes["train"]}
        offsets["test"] = offsets["val"] + self.sizes["val"]
        return {
            split: ProcBlobs(
                length=self.sizes[split],
                image_size=self.image_size,
                max_blobs=self.max_blobs,
                num_classes=self.num_classes,
                seed=self.content_seed,
                offset=offsets[split],
            )
            for split in ("train", "val", "test")
        }

    def reference_info(self, split: str = "train") -> dict[str, Any]:
        return {
            **super().reference_info(split),
            "seed": self.content_seed,
            "max_blobs": self.max_blobs,
        }


class ImageFolderDataModule(ImageDataModule):
    """A folder of images, searched recursively (jpg, jpeg, png, webp).

    Layout: either ``root/train`` (+ optional ``root/val``, ``root/test``), or one flat pool
    ``root/`` whose sorted files are split as train = the first ``N - val_size - test_size``,
    then test, then val = the **last** ``val_size`` (CelebA-HQ 27k/3k in LFM). ``subset`` keeps
    the first N training files (LSUN 120k in LFM). ``class_folders``: labels from the first
    sub-folder under the split root (ImageNet ``train/n01440764/...``). Without a val split, val
    is the first ``fallback_val_size`` training images; without test, test = val.
    """

    def __init__(
        self,
        root: str,
        image_size: int = 256,
        resize: str = "center_crop",
        interpolation: str = "bicubic",
        class_folders: bool = False,
        num_classes: int = 0,
        val_size: int = 0,
        test_size: int = 0,
        subset: int | None = None,
        fallback_val_size: int = 256,
        source: str = "your own image folder",
        prepare: str | None = None,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("name", "image_folder")
        kwargs.setdefault("image_shape", [3, image_size, image_size])
        super().__init__(num_classes=num_classes, **kwargs)
        self.root = Path(root)
        self.resize = resize
        self.interpolation = interpolation
        self.class_folders = class_folders
        self.val_size = val_size
        self.test_size = test_size
        self.subset = subset
        self.fallback_val_size = fallback_val_size
        self.source = source
        self.prepare = prepare
        self.classes: list[str] = []

    def _missing(self, path: Path, reason: str | None = None) -> DatasetNotFoundError:
        expected = "a folder of .jpg/.jpeg/.png/.webp images (searched recursively)"
        if self.class_folders:
            expected += " with one sub-folder per class"
        return DatasetNotFoundError(
            self.name,
            path,
            expected=expected,
            source=self.source,
            prepare=self.prepare,
            reason=reason,
        )

    def _files(self, path: Path) -> list[Path]:
        if not path.is_dir():
            raise self._missing(path)
        files = list_images(path)
        if not files:
            raise self._missing(path, reason="no image files in it")
        return files

    def _folder(self, files: list[Path], labels: list[int] | None, split: str) -> ImageFolder:
        return ImageFolder(
            files,
            labels,
            self.image_size,
            self.resize,
            self.interpolation,
            bad_samples=self.bad_samples.get(split),
        )

    def build(self) -> dict[str, Dataset]:
        split_root = self.root / "train"
        files: dict[str, list[Path]] = {}
        if split_root.is_dir():
            files["train"] = self._files(split_root)
            for split in ("val", "test"):
                if (self.root / split).is_dir():
                    files[split] = self._files(self.root / split)
            roots = {s: self.root / s for s in files}
        else:
            pool = self._files(self.root)
            n_train = len(pool) - self.val_size - self.test_size
            if n_train < 1:
                raise LatentzooError(
                    f"{self.name}: {len(pool)} images in {self.root} but val_size + test_size = "
                    f"{self.val_size + self.test_size}"
                )
            files["train"] = pool[:n_train]
            if self.test_size:
                files["test"] = pool[n_train : n_train + self.test_size]
            if self.val_size:
                files["val"] = pool[len(pool) - self.val_size :]
            roots = dict.fromkeys(files, self.root)
        if self.subset is not None:
            files["train"] = files["train"][: self.subset]
        labels: dict[str, list[int] | None] = dict.fromkeys(files)
        if self.class_folders:
            labels["train"], self.classes = class_labels(files["train"], roots["train"])
            index = {name: i for i, name in enumerate(self.classes)}
            for split in set(files) - {"train"}:
                names = [f.relative_to(roots[split]).parts[0] for f in files[split]]
                unknown = sorted(set(names) - set(index))
                if unknown:
                    raise LatentzooError(
                        f"{self.name}/{split}: classes not in train: {unknown[:5]}"
                    )
                labels[split] = [index[n] for n in names]
            if self.num_classes and len(self.classes) != self.num_classes:
                raise LatentzooError(
                    f"{self.name}: data.num_classes={self.num_classes} but {roots['train']} has "
                    f"{len(self.classes)} class folders"
                )
            self.num_classes = len(self.classes)
        if "val" not in files:
            n = min(self.fallback_val_size, len(files["train"]))
            files["val"], labels["val"] = files["train"][:n], (labels["train"] or [0] * n)[:n]
            log.info(f"{self.name}: no val split; using the first {n} training images")
        if "test" not in files:
            files["test"], labels["test"] = files["val"], labels["val"]
        log.info(f"{self.name}: " + ", ".join(f"{s} {len(f)}" for s, f in files.items()))
        return {split: self._folder(files[split], labels[split], split) for split in files}

    def reference_info(self, split: str = "train") -> dict[str, Any]:
        return {
            **super().reference_info(split),
            "root": str(self.root.resolve()),
            "resize": self.resize,
            "interpolation": self.interpolation,
            "subset": self.subset,
        }


class WebDatasetDataModule(ImageDataModule):
    """Webdataset tar shards (local brace patterns, URLs or ``pipe:`` commands).

    Shards are split per rank and per worker. Training repeats the shard list and cuts epochs
    of ``epoch_length`` samples (global), i.e. ``epoch_length // (world_size * batch_size)``
    batches on every rank, so DDP ranks stay in step. Val/test are one ordered pass (set
    ``val_epoch_length`` to fix their length too).

    Resume is NOT exact for webdataset (unlike the map-style modules, see ``data.resumable``):
    the loader is an iterable stream with no saved position, so a resumed run restarts the
    shard stream (shard shuffle, sample shuffle buffer and random flips in the workers begin
    anew) while the step and epoch counters, weights, optimizer and the model's RNG streams
    continue exactly. Lightning warns that the loader is not resumable.
    """

    def __init__(
        self,
        train_urls: str | Sequence[str],
        val_urls: str | Sequence[str] | None = None,
        test_urls: str | Sequence[str] | None = None,
        image_size: int = 256,
        num_classes: int = 0,
        epoch_length: int | None = None,
        val_epoch_length: int | None = None,
        shuffle_buffer: int = 1000,
        shard_shuffle: int = 100,
        seed: int | None = None,
        resize: str = "center_crop",
        interpolation: str = "bicubic",
        label_key: str | None = "cls",
        source: str = "your own webdataset shards",
        prepare: str | None = None,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("name", "webdataset")
        kwargs.setdefault("image_shape", [3, image_size, image_size])
        super().__init__(num_classes=num_classes, **kwargs)
        self.urls = {"train": train_urls, "val": val_urls or train_urls, "test": test_urls}
        self.urls["test"] = self.urls["test"] or self.urls["val"]
        self.epoch_length = epoch_length
        self.val_epoch_length = val_epoch_length
        self.shuffle_buffer = shuffle_buffer
        self.shard_shuffle = shard_shuffle
        self.seed = seed
        self.resize = resize
        self.interpolation = interpolation
        self.label_key = label_key
        self.source = source
        self.prepare = prepare

    def _check(self, split: str) -> None:
        from latentzoo.data.datasets.webdataset_images import expand_shards, local_shards_missing

        shards = expand_shards(self.urls[split])
        missing = local_shards_missing(shards)
        if missing:
            raise DatasetNotFoundError(
                self.name,
                missing[0],
                expected=f"{len(shards)} tar shards matching {self.urls[split]} "
                f"({len(missing)} missing) with image entries (.jpg/.png/.webp) and optional .cls",
                source=self.source,
                prepare=self.prepare,
            )

    def build(self) -> dict[str, Dataset]:
        for split in ("train", "val", "test"):
            self._check(split)
        return {}  # pipelines are made per loader

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        self.datasets = self.datasets or {"checked": None}  # type: ignore[dict-item]

    def _pipeline(self, split: str, train: bool, batch_size: int) -> Any:
        from latentzoo.data.datasets.webdataset_images import image_pipeline

        self.setup()
        pipeline = image_pipeline(
            self.urls[split],
            image_size=self.image_size,
            train=train,
            resize=self.resize,
            interpolation=self.interpolation,
            shuffle_buffer=self.shuffle_buffer,
            shard_shuffle=self.shard_shuffle,
            seed=self.seed,
            label_key=self.label_key,
            bad_samples=self.bad_samples.get(split),
        )
        return pipeline.batched(
            batch_size, collation_fn=ImageCollate(flip=train and self.flip), partial=not train
        )

    def _web_loader(self, pipeline: Any, batches: int | None, train: bool) -> Any:
        import webdataset as wds

        loader = wds.WebLoader(
            pipeline,
            batch_size=None,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0 and train,
        )
        return loader.with_epoch(batches) if batches else loader

    def _world_size(self) -> int:
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            return trainer.world_size
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_world_size()
        return 1

    def train_dataloader(self) -> Any:
        self.setup()  # missing shards first
        if not self.epoch_length:
            raise LatentzooError(
                f"{self.name}: set data.epoch_length (training samples per epoch, all ranks "
                "together) for webdataset training, e.g. the number of images in the shards"
            )
        batches = self.epoch_length // (self._world_size() * self.batch_size)
        if batches < 1:
            raise LatentzooError(f"{self.name}: epoch_length {self.epoch_length} < one batch/rank")
        return self._web_loader(self._pipeline("train", True, self.batch_size), batches, True)

    def _eval_loader(self, split: str, batch_size: int) -> Any:
        batches = None
        if self.val_epoch_length:
            batches = max(1, self.val_epoch_length // (self._world_size() * batch_size))
        return self._web_loader(self._pipeline(split, False, batch_size), batches, False)

    def val_dataloader(self) -> Any:
        return self._eval_loader("val", self.batch_size)

    def test_dataloader(self) -> Any:
        return self._eval_loader("test", self.batch_size)

    def reference_dataset(self, split: str = "train") -> Dataset:
        raise LatentzooError(
            f"{self.name}: webdataset shards are a stream without indexed access, so they cannot "
            "be cached in order or resumed; unpack them to an image folder (data=image_folder) "
            "or an LMDB (data=lmdb_images) first"
        )

    def reference_dataloader(
        self, split: str = "train", batch_size: int = 100, rank: int = 0, world_size: int = 1
    ) -> Any:
        """One ordered pass; shards are already split by rank (``wds.split_by_node``)."""
        return self._web_loader(self._pipeline(split, False, batch_size), None, False)

    def reference_info(self, split: str = "train") -> dict[str, Any]:
        return {
            "dataset": self.name,
            "split": split,
            "image_shape": list(self.image_shape),
            "urls": str(self.urls[split]),
            "resize": self.resize,
            "interpolation": self.interpolation,
        }
