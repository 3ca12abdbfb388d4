"""Labelled image sets (datasets.md §4, §5, §9, §11) for NFPI, Soft-IntroVAE and DLP.

``TorchvisionDataModule`` (MNIST, FashionMNIST, CIFAR-10/100, SVHN via torchvision),
``ImageNet32DataModule`` (Chrabaszcz et al. 2017 downsampled ImageNet ``.npz`` batches),
``SklearnDigitsDataModule`` (scikit-learn's bundled 8x8 digits, offline) and
``ProcCIFARDataModule`` (procedural CIFAR-10 stand-in) share :class:`LabelledImageDataModule`:

* images stay uint8 ``[C, H, W]`` in memory; loaders yield ``(float32 [B, C, H, W] in [0, 1],
  int64 [B])`` like every :class:`~latentzoo.data.images.ImageDataModule`;
* ``image_size`` resizes the native images, then ``pad`` adds zeros on each side (MNIST 28 ->
  32 with ``pad=2``, as NFPI), so the output side is ``image_size + 2 * pad``; ``channels=3``
  replicates grey to RGB;
* ``items_per_class`` keeps a seeded per-class subset of the training split (NFPI's short runs);
  ``prior_fit_items_per_class`` sizes the set :meth:`prior_fit_dataloader` passes over (null:
  the training subset, as the release configs; 0: the whole training pool);
* ``test_noise`` > 0 adds U(0, test_noise) to every val/test image (NFPI MNIST, as the release);
* ``augment`` acts on the training split only: ``flip`` (per batch in the collate), or the NFPI
  recipes ``nfpi_cifar`` / ``nfpi_mnist`` (torchvision.transforms.v2 per item, so DataLoader
  workers do the work). Val/test and the FID reference pass are never augmented;
* val = ``val_size`` training images held out by ``split_seed`` (unless the set has its own
  val split), so that model selection never sees the test set; ``val_size=0`` trains on the
  full train set (the NFPI and Soft-IntroVAE protocols: no validation, the final weights),
  and val is then only a preview batch of training images for the image grids;
* ``seed`` seeds the training order and batch randomness; null = the run seed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.functional import interpolate
from torch.utils.data import DataLoader, Dataset, Subset

from latentzoo.data.datasets.errors import DatasetFormatError, DatasetNotFoundError
from latentzoo.data.images import ImageDataModule
from latentzoo.utils.logging import RankedLogger

log = RankedLogger(__name__, rank_zero_only=True)

__all__ = [
    "AUGMENTS",
    "UniformNoise",
    "CIFAR10DataModule",
    "ImageNet32DataModule",
    "LabelledImageDataModule",
    "LabelledImages",
    "ProcCIFARDataModule",
    "SklearnDigitsDataModule",
    "TorchvisionDataModule",
    "make_augment",
]

AUGMENTS = ("none", "flip", "nfpi_cifar", "nfpi_mnist")


class UniformNoise:
    """uint8 image -> float in [0, 1] plus U(0, ``high``) per pixel (NFPI MNIST). Not clamped:
    values up to 1 + high reach the model, as in the release (its flow does not round them)."""

    def __init__(self, high: float) -> None:
        self.high = high

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        x = image.to(torch.float32).div_(255.0) if image.dtype == torch.uint8 else image.float()
        return x + torch.rand_like(x).mul_(self.high)


def make_augment(kind: str, size: int) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The per-item training transform for ``augment=kind`` on uint8 ``[C, size, size]`` images.

    ``nfpi_cifar``: hflip, ColorJitter(0.1, 0.1, 0.05), edge-pad 8, rotation +-12 deg,
    CenterCrop(size + 4), RandomCrop(size). ``nfpi_mnist`` (after the module's zero ``pad``, the
    release's Pad(2)): edge-pad 8, rotation +-12 deg, CenterCrop(size + 4), RandomCrop(size)
    (a translation of up to +-2 px), + U(0, 0.05) noise, not clamped (returns float).
    ``none``/``flip`` -> None (the flip is done per batch by the collate).
    """
    if kind not in AUGMENTS:
        raise ValueError(f"augment must be one of {AUGMENTS}, got {kind!r}")
    from torchvision.transforms import v2

    if kind == "nfpi_cifar":
        return v2.Compose(
            [
                v2.RandomHorizontalFlip(),
                v2.ColorJitter(brightness=0.1, contrast=0.1, saturation=0.05),
                v2.Pad(8, padding_mode="edge"),
                v2.RandomRotation(12),
                v2.CenterCrop(size + 4),
                v2.RandomCrop(size),
            ]
        )
    if kind == "nfpi_mnist":
        return v2.Compose(
            [
                v2.Pad(8, padding_mode="edge"),
                v2.RandomRotation(12),
                v2.CenterCrop(size + 4),
                v2.RandomCrop(size),
                UniformNoise(0.05),
            ]
        )
    return None


class LabelledImages(Dataset):
    """Items ``(image [C, H, W] uint8 (float after nfpi_mnist), label int64)``.

    ``source`` is a uint8 tensor ``[N, C, H, W]`` or a renderer with ``images_u8_of(indices)``
    (proc_cifar); ``indices`` selects a subset; ``transform`` is applied per item;
    ``channels=3`` replicates a grey channel.
    """

    def __init__(
        self,
        source: Any,
        labels: torch.Tensor,
        indices: torch.Tensor | None = None,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        channels: int | None = None,
    ) -> None:
        self.source = source
        self.labels = torch.as_tensor(labels, dtype=torch.int64)
        self.indices = indices if indices is not None else torch.arange(len(self.labels))
        self.transform = transform
        self.channels = channels

    def without_augment(self) -> LabelledImages:
        return LabelledImages(self.source, self.labels, self.indices, None, self.channels)

    def __len__(self) -> int:
        return len(self.indices)

    def _fetch(self, idx: torch.Tensor) -> torch.Tensor:
        if isinstance(self.source, torch.Tensor):
            return self.source[idx]
        return self.source.images_u8_of(idx.numpy())

    def __getitems__(self, positions: Sequence[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        idx = self.indices[torch.as_tensor(positions, dtype=torch.int64)]
        images = list(self._fetch(idx).unbind(0))
        if self.transform is not None:
            images = [self.transform(image) for image in images]
        if self.channels == 3:
            images = [x.expand(3, -1, -1) if x.shape[0] == 1 else x for x in images]
        return list(zip(images, self.labels[idx].unbind(0), strict=True))

    def __getitem__(self, position: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.__getitems__([position])[0]


class LabelledImageDataModule(ImageDataModule):
    """Shared resize / pad / channels / items_per_class / augment / val logic (module docstring).

    Subclasses implement :meth:`load` -> ``{"train": (images, labels), "test": ..., ["val": ...]}``
    with uint8 ``[N, C, H, W]`` images (or a renderer) and int64 labels.
    """

    native_shape: tuple[int, int, int] = (3, 32, 32)

    def __init__(
        self,
        image_size: int | None = None,
        pad: int = 0,
        channels: int | None = None,
        resolution: int | None = None,
        augment: str = "none",
        items_per_class: int = 0,
        subset_seed: int = 0,
        prior_fit_items_per_class: int | None = None,
        test_noise: float = 0.0,
        val_size: int = 1000,
        split_seed: int = 0,
        interpolation: str = "bicubic",
        flip: bool | None = None,
        **kwargs: Any,
    ) -> None:
        native_c, native_size = self.native_shape[0], self.native_shape[-1]
        self.resize_to = int(image_size or native_size)
        self.pad = int(pad)
        side = self.resize_to + 2 * self.pad
        if resolution is not None and int(resolution) != side:
            raise ValueError(
                f"data.resolution={resolution} but image_size {self.resize_to} + 2 * pad "
                f"{self.pad} = {side}: set data.resolution={side} with data.pad={self.pad}"
            )
        if channels not in (None, native_c, 3):
            raise ValueError(f"channels must be {native_c} or 3, got {channels}")
        if flip is not None:  # legacy ImageDataModule knob: flip=true is augment=flip
            augment = "flip" if flip and augment == "none" else augment
            augment = "none" if not flip and augment == "flip" else augment
        if augment not in AUGMENTS:
            raise ValueError(f"data.augment must be one of {AUGMENTS}, got {augment!r}")
        shape = [int(channels or native_c), side, side]
        kwargs.setdefault("image_shape", shape)
        super().__init__(flip=augment == "flip", **kwargs)
        if list(self.image_shape) != shape:
            raise ValueError(
                f"data.image_shape={list(self.image_shape)} but the images are {shape} "
                f"(channels {shape[0]}, image_size {self.resize_to} + 2 * pad {self.pad})"
            )
        self.channels = channels
        self.augment = augment
        self.items_per_class = int(items_per_class)
        self.subset_seed = subset_seed
        self.prior_fit_items_per_class = (
            None if prior_fit_items_per_class is None else int(prior_fit_items_per_class)
        )
        self.test_noise = float(test_noise)
        if self.test_noise < 0:
            raise ValueError(f"data.test_noise must be >= 0 (0: off), got {test_noise}")
        self.val_size = int(val_size)
        self.split_seed = split_seed
        self.interpolation = interpolation
        if self.val_size < 0:
            raise ValueError(f"data.val_size must be >= 0 (0: no validation), got {val_size}")

    def load(self) -> dict[str, tuple[Any, torch.Tensor]]:
        raise NotImplementedError

    def _prepare_images(self, images: Any) -> Any:
        """Resize to ``image_size`` and zero-pad by ``pad`` (tensors; renderers are native)."""
        if not isinstance(images, torch.Tensor):
            return images
        if images.shape[-1] != self.resize_to:
            mode = self.interpolation
            kw = {"antialias": True} if mode in ("bilinear", "bicubic") else {}
            out = interpolate(images.float(), size=self.resize_to, mode=mode, **kw)
            images = out.round().clamp(0, 255).to(torch.uint8)
        if self.pad:
            images = torch.nn.functional.pad(images, [self.pad] * 4)
        return images.contiguous()

    def class_subset(self, labels: torch.Tensor, per_class: int | None = None) -> torch.Tensor:
        """Sorted indices of ``per_class`` (default ``items_per_class``) seeded picks per class
        (all when 0). One permutation per class by ``subset_seed``, so a smaller subset is
        always inside a larger one."""
        per_class = self.items_per_class if per_class is None else per_class
        if per_class <= 0:
            return torch.arange(len(labels))
        rng = np.random.default_rng(self.subset_seed)
        y = labels.numpy()
        keep = []
        for c in np.unique(y):
            members = np.flatnonzero(y == c)
            if len(members) < per_class:
                log.warning(f"{self.name}: class {c} has {len(members)} < {per_class} per class")
            keep.append(rng.permutation(members)[:per_class])
        return torch.from_numpy(np.sort(np.concatenate(keep)))

    def held_out(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(val, train) indices of a train split of ``size`` items: ``val_size`` of them by
        ``split_seed``, sorted; none when ``val_size`` is 0."""
        if self.val_size >= size:
            raise ValueError(f"data.val_size={self.val_size} >= the {size} training images")
        order = torch.from_numpy(np.random.default_rng(self.split_seed).permutation(size))
        return order[: self.val_size].sort().values, order[self.val_size :].sort().values

    def build(self) -> dict[str, Dataset]:
        splits = self.load()
        channels = self.channels if self.channels != self.native_shape[0] else None
        out: dict[str, Dataset] = {}
        for split, (images, labels) in splits.items():
            images = self._prepare_images(images)
            if split != "train":
                noise = UniformNoise(self.test_noise) if self.test_noise else None
                out[split] = LabelledImages(images, labels, transform=noise, channels=channels)
                continue
            val, pool = self.held_out(len(labels)) if "val" not in splits else (None, None)
            pool = torch.arange(len(labels)) if pool is None else pool
            train = pool[self.class_subset(labels[pool])]
            if val is not None:  # no validation (val_size 0): a preview batch for the grids
                val = val if len(val) else train[: self.batch_size]
                out["val"] = LabelledImages(images, labels, val, channels=channels)
            transform = make_augment(self.augment, self.image_shape[-1])
            out["train"] = LabelledImages(images, labels, train, transform, channels)
            fit = self.prior_fit_items_per_class
            if fit is not None and fit != self.items_per_class:
                fit_idx = pool[self.class_subset(labels[pool], fit)]
                out["prior_fit"] = LabelledImages(images, labels, fit_idx, transform, channels)
        log.info(f"{self.name}: " + ", ".join(f"{s} {len(d)}" for s, d in out.items()))  # type: ignore[arg-type]
        return out

    def prior_fit_dataloader(
        self, augment: bool = True, batch_size: int | None = None
    ) -> DataLoader:
        """Ordered pass over the images a class-conditional prior is fitted on (NFPI's
        "validation" pass): the training subset, or ``prior_fit_items_per_class`` per class of
        the training pool (0: all of it), with the training augmentation unless ``augment`` is
        false. The caller shards batches under DDP."""
        self.setup()
        dataset = self.datasets.get("prior_fit", self.datasets["train"])
        if not augment and isinstance(dataset, LabelledImages):
            dataset = dataset.without_augment()
        return self._loader(dataset, train=False, batch_size=batch_size)

    def reference_dataloader(
        self, split: str = "train", batch_size: int = 100, rank: int = 0, world_size: int = 1
    ) -> DataLoader:
        """Ordered pass over ``split`` without the per-item training augmentation."""
        dataset = self._dataset(split)
        if isinstance(dataset, LabelledImages):
            dataset = dataset.without_augment()
        if world_size > 1:
            dataset = Subset(dataset, range(rank, len(dataset), world_size))
        return self._loader(dataset, train=False, batch_size=batch_size)

    def reference_info(self, split: str = "train") -> dict[str, Any]:
        info = {**super().reference_info(split), "pad": self.pad}
        if split in ("train", "val"):
            info.update(val_size=self.val_size, split_seed=self.split_seed)
        if split == "train":
            info.update(items_per_class=self.items_per_class, subset_seed=self.subset_seed)
        return info


# --------------------------------------------------------------------------------- torchvision

MNIST_FILES = tuple(
    f"{s}-{k}-idx{d}-ubyte" for s in ("train", "t10k") for k, d in (("images", 3), ("labels", 1))
)
# name -> (torchvision class, folder under root, expected files, source URL, native shape)
TORCHVISION: dict[str, tuple[str, str, tuple[str, ...], str, tuple[int, int, int]]] = {
    "mnist": (
        "MNIST",
        "MNIST/raw",
        MNIST_FILES,
        "https://ossci-datasets.s3.amazonaws.com/mnist/ (torchvision's mirror of yann.lecun.com)",
        (1, 28, 28),
    ),
    "fashion_mnist": (
        "FashionMNIST",
        "FashionMNIST/raw",
        MNIST_FILES,
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        (1, 28, 28),
    ),
    "cifar10": (
        "CIFAR10",
        "cifar-10-batches-py",
        (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta"),
        "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        (3, 32, 32),
    ),
    "cifar100": (
        "CIFAR100",
        "cifar-100-python",
        ("train", "test", "meta"),
        "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        (3, 32, 32),
    ),
    "svhn": (
        "SVHN",
        ".",
        ("train_32x32.mat", "test_32x32.mat", "[extra_32x32.mat]"),
        "http://ufldl.stanford.edu/housenumbers/",
        (3, 32, 32),
    ),
}
NUM_CLASSES = {"mnist": 10, "fashion_mnist": 10, "cifar10": 10, "cifar100": 100, "svhn": 10}


class TorchvisionDataModule(LabelledImageDataModule):
    """MNIST | fashion_mnist | cifar10 | cifar100 | svhn through torchvision's own loaders.

    Looks for torchvision's layout under ``root`` (``MNIST/raw/*-ubyte``, ``FashionMNIST/raw``,
    ``cifar-10-batches-py/``, ``cifar-100-python/``, ``{train,test,extra}_32x32.mat``);
    ``download=true`` fetches it (when online). SVHN ``splits``: ``[train]`` (Soft-IntroVAE)
    or ``[train, extra]`` (NFPI) for training; test is always ``test_32x32.mat``.
    """

    def __init__(
        self,
        root: str,
        dataset: str = "cifar10",
        download: bool = False,
        splits: Sequence[str] = ("train",),
        **kwargs: Any,
    ) -> None:
        if dataset not in TORCHVISION:
            raise ValueError(f"data.dataset must be one of {sorted(TORCHVISION)}, got {dataset!r}")
        self.dataset = dataset
        self.native_shape = TORCHVISION[dataset][4]
        kwargs.setdefault("name", dataset)
        kwargs.setdefault("num_classes", NUM_CLASSES[dataset])
        super().__init__(**kwargs)
        self.root = Path(root)
        self.download = download
        self.splits = list(splits)
        if dataset != "svhn" and self.splits != ["train"]:
            raise ValueError(f"data.splits is an SVHN option (got {self.splits} for {dataset})")
        if not set(self.splits) <= {"train", "extra"} or "train" not in self.splits:
            raise ValueError(f"SVHN data.splits must be [train] or [train, extra], got {splits}")

    @property
    def folder(self) -> Path:
        return self.root / TORCHVISION[self.dataset][1]

    def _files(self) -> list[str]:
        files = [f for f in TORCHVISION[self.dataset][2] if not f.startswith("[")]
        return files + (["extra_32x32.mat"] if "extra" in self.splits else [])

    def _error(self, reason: str | None = None) -> DatasetNotFoundError:
        tv_name, _, _, url, _ = TORCHVISION[self.dataset]
        return DatasetNotFoundError(
            tv_name,
            self.folder,
            expected=f"{self.folder}/ with {', '.join(self._files())} (torchvision layout)",
            source=url,
            download_override="data.download=true",
            reason=reason,
        )

    def _torchvision(self, part: str, download: bool = False) -> Any:
        import torchvision.datasets as tvd

        cls = getattr(tvd, TORCHVISION[self.dataset][0])
        if self.dataset == "svhn":
            return cls(str(self.root), split=part, download=download)
        return cls(str(self.root), train=part == "train", download=download)

    def prepare_data(self) -> None:
        if self.download:
            for part in [*self.splits, "test"]:
                try:
                    self._torchvision(part, download=True)
                except Exception as error:  # offline, proxy, checksum
                    raise self._error(f"download failed: {error}") from error

    def _part(self, part: str) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            ds = self._torchvision(part)
        except RuntimeError as error:  # torchvision: missing or failed checksum
            raise self._error(f"torchvision refused it: {error}") from error
        data = torch.as_tensor(np.asarray(ds.data))
        if data.ndim == 3:  # MNIST (N, H, W)
            data = data[:, None]
        elif data.shape[-1] == 3:  # CIFAR (N, H, W, C)
            data = data.permute(0, 3, 1, 2)
        labels = ds.labels if self.dataset == "svhn" else ds.targets
        return data.contiguous(), torch.as_tensor(np.asarray(labels), dtype=torch.int64)

    def load(self) -> dict[str, tuple[Any, torch.Tensor]]:
        if not all((self.folder / f).is_file() for f in self._files()):
            self.prepare_data()
            missing = [f for f in self._files() if not (self.folder / f).is_file()]
            if missing:
                raise self._error(f"missing {', '.join(missing)}")
        parts = [self._part(p) for p in self.splits]
        train = (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))
        return {"train": train, "test": self._part("test")}

    def reference_info(self, split: str = "train") -> dict[str, Any]:
        info = {**super().reference_info(split), "root": str(self.root.resolve())}
        return info | ({"splits": self.splits} if self.dataset == "svhn" else {})


# ---------------------------------------------------------------------------------- ImageNet 32


class ImageNet32DataModule(LabelledImageDataModule):
    """Downsampled ImageNet (Chrabaszcz, Loshchilov, Hutter 2017), labelled, 1000 classes.

    Reads the published batches from ``root`` in either format image-net.org distributes:
    ``Imagenet32_train_npz.zip`` / ``Imagenet32_val_npz.zip`` (``train_data_batch_1..10.npz``,
    ``val_data.npz``) or ``Imagenet32_train.zip`` / ``Imagenet32_val.zip`` (the same names without
    extension, pickled dicts). Each has ``data`` (N, 3 * S * S) uint8 rows (R plane, G plane,
    B plane, as CIFAR) and ``labels`` 1..1000 (made 0-based). The files may sit in ``root`` or in
    the zips' own folders (``root/Imagenet32_train_npz/`` ...). Train = the first
    ``train_batches`` files, concatenated into one preallocated array (about 3.9 GB for all ten at
    32x32); test = the official 50k val set; val = ``val_size`` held-out training images.
    ``download=true`` fetches the npz zips (image-net.org asks for a login, so this usually fails
    with a one-line error saying where to put the files by hand).
    """

    URL = "https://image-net.org/download-images (Downsampled ImageNet 32x32, npz; login)"
    ZIP_URL = "https://image-net.org/data/downsample/Imagenet{size}_{part}_npz.zip"

    def __init__(
        self,
        root: str,
        native_size: int = 32,
        train_batches: int = 10,
        download: bool = False,
        **kwargs: Any,
    ) -> None:
        self.native_shape = (3, native_size, native_size)
        kwargs.setdefault("name", "imagenet32_labelled")
        kwargs.setdefault("num_classes", 1000)
        super().__init__(**kwargs)
        self.root = Path(root)
        self.train_batches = int(train_batches)
        self.download = download

    def _names(self) -> list[str]:
        names = [f"train_data_batch_{i}" for i in range(1, self.train_batches + 1)]
        return [*names, "val_data"]

    def _locate(self, name: str) -> Path | None:
        """The npz or pickle batch ``name`` in ``root`` or the published zips' folders."""
        size = self.native_shape[-1]
        part = "val" if name == "val_data" else "train"
        for folder in (
            self.root,
            self.root / f"Imagenet{size}_{part}_npz",
            self.root / f"Imagenet{size}_{part}",
        ):
            for path in (folder / f"{name}.npz", folder / name):
                if path.is_file():
                    return path
        return None

    def _not_found(self, missing: list[str], reason: str | None = None) -> DatasetNotFoundError:
        return DatasetNotFoundError(
            "ImageNet32 (downsampled, labelled)",
            self.root,
            expected=f"train_data_batch_1..{self.train_batches} and val_data, as .npz or pickle "
            f"batches (missing {', '.join(missing[:3])})",
            source=self.URL,
            download_override="data.download=true",
            reason=reason,
        )

    def prepare_data(self) -> None:
        if not self.download or all(self._locate(n) for n in self._names()):
            return
        import zipfile

        from latentzoo.data.datasets.download import download_url

        size = self.native_shape[-1]
        for part in ("train", "val"):
            url = self.ZIP_URL.format(size=size, part=part)
            try:
                archive = download_url(url, self.root / Path(url).name, name=self.name)
            except DatasetNotFoundError as error:  # offline, HTTP error: one line, what to do
                reason = " ".join(str(error).split())
                raise self._not_found(["all"], f"download failed: {reason}") from error
            try:
                with zipfile.ZipFile(archive) as z:
                    z.extractall(self.root)
            except zipfile.BadZipFile as error:  # a login page instead of the archive
                archive.unlink(missing_ok=True)
                raise self._not_found(["all"], f"{url} did not return a zip: {error}") from error

    @staticmethod
    def _load_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
        """(rows, labels) of one npz or pickled batch."""
        if path.suffix == ".npz":
            with np.load(path) as z:
                if "data" not in z.files or "labels" not in z.files:
                    raise DatasetFormatError(f"{path}: keys {z.files}, need data, labels")
                return z["data"], np.asarray(z["labels"], dtype=np.int64).reshape(-1)
        import pickle

        with open(path, "rb") as f:
            try:
                batch = pickle.load(f)
            except Exception as error:
                msg = f"{path}: not a pickled ImageNet32 batch ({error})"
                raise DatasetFormatError(msg) from error
        if not isinstance(batch, dict) or "data" not in batch or "labels" not in batch:
            raise DatasetFormatError(f"{path}: a pickled dict with data and labels expected")
        return np.asarray(batch["data"]), np.asarray(batch["labels"], dtype=np.int64).reshape(-1)

    def _read(self, paths: list[Path]) -> tuple[torch.Tensor, torch.Tensor]:
        c, s = self.native_shape[0], self.native_shape[-1]
        rows_list, labels = [], []
        for path in paths:
            log.info(f"{self.name}: reading {path}")
            rows, y = self._load_batch(path)
            if rows.shape != (len(y), c * s * s):
                raise DatasetFormatError(
                    f"{path}: data {rows.shape}, expected ({len(y)}, {c * s * s}) for "
                    f"{s}x{s} (set data.native_size for ImageNet 16/64)"
                )
            rows_list.append(rows)
            labels.append(y)
        data = np.concatenate(rows_list).astype(np.uint8, copy=False)
        y = np.concatenate(labels) - 1  # 1-based -> 0-based
        if y.min() < 0 or y.max() >= self.num_classes:
            raise DatasetFormatError(f"{self.name}: labels outside 1..{self.num_classes}")
        images = torch.from_numpy(data).view(-1, c, s, s)  # plane-major rows -> CHW
        return images, torch.from_numpy(y)

    def load(self) -> dict[str, tuple[Any, torch.Tensor]]:
        self.prepare_data()
        paths = {n: self._locate(n) for n in self._names()}
        missing = [n for n, p in paths.items() if p is None]
        if missing:
            raise self._not_found(missing)
        train = self._read([paths[n] for n in self._names()[:-1]])  # type: ignore[misc]
        return {"train": train, "test": self._read([paths["val_data"]])}  # type: ignore[list-item]

    def reference_info(self, split: str = "train") -> dict[str, Any]:
        info = {**super().reference_info(split), "root": str(self.root.resolve())}
        return info | {"train_batches": self.train_batches}


# ------------------------------------------------------------------------- scikit-learn digits


class SklearnDigitsDataModule(LabelledImageDataModule):
    """scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes; offline).

    Grey levels 0..16 map to [0, 1] (stored as uint8 ``round(v * 255 / 16)``); ``image_size``
    resizes (``interpolation`` nearest or bilinear). A fixed stratified split by ``split_seed``:
    ``test_size`` and ``val_size`` images, the rest train.
    """

    native_shape = (1, 8, 8)

    def __init__(
        self, test_size: int = 360, val_size: int = 180, split_seed: int = 0, **kwargs: Any
    ) -> None:
        kwargs.setdefault("name", "sk_digits")
        kwargs.setdefault("num_classes", 10)
        kwargs.setdefault("interpolation", "nearest")
        super().__init__(val_size=val_size, **kwargs)
        self.test_size = test_size
        self.split_seed = split_seed

    def load(self) -> dict[str, tuple[Any, torch.Tensor]]:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        digits = load_digits()
        images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
        labels = digits.target.astype(np.int64)
        index = np.arange(len(labels))
        rest, test = train_test_split(
            index, test_size=self.test_size, stratify=labels, random_state=self.split_seed
        )
        train, val = train_test_split(
            rest, test_size=self.val_size, stratify=labels[rest], random_state=self.split_seed
        )
        return {
            s: (torch.from_numpy(images[np.sort(i)]), torch.from_numpy(labels[np.sort(i)]))
            for s, i in (("train", train), ("val", val), ("test", test))
        }

    def reference_info(self, split: str = "train") -> dict[str, Any]:
        return {**super().reference_info(split), "split_seed": self.split_seed}


# ------------------------------------------------------------------------------------ proc_cifar


class ProcCIFARDataModule(LabelledImageDataModule):
    """``proc_cifar`` (datasets.md §11): the procedural CIFAR-10 stand-in, no download.

    ``num_train`` / ``num_test`` images rendered on demand from ``(seed, split, index)``
    (``cache`` keeps them per process); val = ``val_size`` held-out training images.
    ``content_seed`` picks the rendered images (it defines the dataset); ``seed`` is the sampler's.
    """

    def __init__(
        self,
        image_size: int = 32,
        num_train: int = 50_000,
        num_test: int = 10_000,
        content_seed: int = 0,
        cache: bool = True,
        **kwargs: Any,
    ) -> None:
        self.native_shape = (3, image_size, image_size)  # rendered natively at any size
        kwargs.setdefault("name", "proc_cifar")
        kwargs.setdefault("num_classes", 10)
        super().__init__(image_size=image_size, **kwargs)
        if self.pad:
            raise ValueError("proc_cifar renders at image_size; use data.image_size, not pad")
        self.sizes = {"train": num_train, "test": num_test}
        self.content_seed = content_seed
        self.cache = cache

    def load(self) -> dict[str, tuple[Any, torch.Tensor]]:
        from latentzoo.data.datasets.proc_cifar import ProcCIFAR

        out = {}
        for split, n in self.sizes.items():
            ds = ProcCIFAR(split, n, self.resize_to, self.content_seed, cache=self.cache)  # type: ignore[arg-type]
            out[split] = (ds, ds.labels)
        return out

    def reference_info(self, split: str = "train") -> dict[str, Any]:
        return {**super().reference_info(split), "seed": self.content_seed}


class CIFAR10DataModule(TorchvisionDataModule):
    """CIFAR-10 (kept for existing configs/imports): ``TorchvisionDataModule(dataset=cifar10)``
    with the random horizontal flip on unless ``augment``/``flip`` say otherwise."""

    def __init__(self, root: str, **kwargs: Any) -> None:
        kwargs.setdefault("dataset", "cifar10")
        if "flip" not in kwargs:
            kwargs.setdefault("augment", "flip")
        super().__init__(root, **kwargs)
