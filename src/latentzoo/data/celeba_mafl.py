"""CelebA / MAFL for DLP (dlp.md §5-6, datasets.md §6): the DVE protocol the original reads.

Files (the official CelebA layout, or DVE's ``celeba.tar.gz`` which has the same tree; the
flat latentzoo layout ``root/img_align_celeba`` + annotation files in ``root`` also works):

- ``Img/img_align_celeba/*.jpg`` (or ``Img/img_align_celeba_hq``, DVE's higher-quality copy
  that the original prefers when present): aligned 178 x 218 images;
- ``Anno/list_landmarks_align_celeba.txt``: line 1 the image count, line 2 the ten column names
  ``lefteye_x lefteye_y righteye_x righteye_y nose_x nose_y leftmouth_x leftmouth_y
  rightmouth_x rightmouth_y``, then ``<name> x1 y1 ... x5 y5`` per image (pixels);
- ``Eval/list_eval_partition.txt``: ``<name> <0|1|2>`` (train / val / test);
- ``MAFL/training.txt`` and ``MAFL/testing.txt``: one image name per line (19,000 / 1,000).

Splits (the original's ``CelebAPrunedAligned_MAFLVal`` and ``MAFLAligned``), all in CelebA file
order: **train** = CelebA partition 0 without any MAFL image; **val** = the first ``val_size``
images of partition 2 without MAFL images (the original's ``val_split="celeba"``); **test** and
the landmark "test" split = MAFL testing; the landmark "train" split = MAFL training.

Pre-processing: crop rows 30..208 (the 178 x 178 square that moves the head up), resize to 160
(bilinear), then crop 16 px per side -> 128 x 128. Landmarks follow: ``(x, y - 30) · 160/178 -
16``, (x, y) pixels of the 128 px image. With ``prior_pairs`` the training items are the TPS pair
of :class:`~latentzoo.data.tps.TPSPairWarper` (warped at 160 px before the crop), batched as
``{"image": x, "prior_image": x_prior}``; val / test / landmark batches are never warped.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from latentzoo.data.datasets.download import download_url
from latentzoo.data.datasets.errors import DatasetFormatError, DatasetNotFoundError
from latentzoo.data.images import ImageDataModule
from latentzoo.data.resumable import resumable_loader
from latentzoo.data.tps import TPSPairWarper

__all__ = [
    "CelebAMAFLDataModule",
    "LANDMARK_COLUMNS",
    "MAFL_URLS",
    "PairCollate",
    "align_landmarks",
    "read_eval_partition",
    "read_landmarks",
    "read_name_list",
]

LANDMARK_COLUMNS = [
    f"{part}_{axis}"
    for part in ("lefteye", "righteye", "nose", "leftmouth", "rightmouth")
    for axis in "xy"
]
ALIGNED_SIZE = (178, 218)  # width, height of img_align_celeba
SQUARE_TOP, SQUARE = 30, 178  # the original's initial crop: rows 30..208, all 178 columns
MAFL_URLS = {
    split: f"https://raw.githubusercontent.com/zhzhanp/TCDCN-face-alignment/master/MAFL/{split}.txt"
    for split in ("training", "testing")
}
CELEBA_SOURCE = (
    "CelebA (https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html: Img/img_align_celeba.zip, "
    "Anno/list_landmarks_align_celeba.txt, Eval/list_eval_partition.txt; manual download) or "
    "DVE's copy with the MAFL lists (http://www.robots.ox.ac.uk/~vgg/research/DVE/data/"
    "datasets/celeba.tar.gz)"
)


def read_landmarks(path: str | Path) -> tuple[list[str], np.ndarray]:
    """``list_landmarks_align_celeba.txt`` -> (names, landmarks [N, 5, 2] float32 (x, y))."""
    lines = Path(path).read_text().splitlines()
    if len(lines) < 2 or not lines[0].strip().isdigit() or lines[1].split() != LANDMARK_COLUMNS:
        raise DatasetFormatError(
            f"{path}: expected the image count on line 1 and the columns "
            f"'{' '.join(LANDMARK_COLUMNS)}' on line 2 (CelebA's list_landmarks_align_celeba.txt)"
        )
    rows = [line.split() for line in lines[2:] if line.strip()]
    if len(rows) != int(lines[0]) or any(len(r) != 11 for r in rows):
        raise DatasetFormatError(
            f"{path}: line 1 announces {int(lines[0])} images, found {len(rows)} rows "
            "(each must be '<name> x1 y1 ... x5 y5'); the file is truncated or not CelebA's"
        )
    coords = np.asarray([r[1:] for r in rows], dtype=np.float32).reshape(-1, 5, 2)
    return [r[0] for r in rows], coords


def read_eval_partition(path: str | Path) -> dict[str, int]:
    """``list_eval_partition.txt`` -> {name: 0 (train) | 1 (val) | 2 (test)}."""
    out = {}
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2 or fields[1] not in ("0", "1", "2"):
            raise DatasetFormatError(f"{path}:{number}: expected '<name> <0|1|2>', got {line!r}")
        out[fields[0]] = int(fields[1])
    return out


def read_name_list(path: str | Path) -> list[str]:
    """MAFL ``training.txt`` / ``testing.txt``: one image name per line (first field)."""
    return [line.split()[0] for line in Path(path).read_text().splitlines() if line.strip()]


def align_landmarks(landmarks: np.ndarray, imwidth: int = 160, crop: int = 16) -> np.ndarray:
    """Landmarks of the aligned 178 x 218 image -> (x, y) pixels of the ``imwidth - 2·crop``
    image: shift up by the square crop, scale to ``imwidth``, then remove the border crop."""
    out = np.array(landmarks, dtype=np.float32, copy=True)
    out[..., 1] -= SQUARE_TOP
    return out * (imwidth / SQUARE) - crop


def load_aligned(path: Path, imwidth: int) -> Image.Image:
    """Aligned CelebA image -> the 178 x 178 head square resized to imwidth (bilinear)."""
    with Image.open(path) as image:
        if image.size != ALIGNED_SIZE:
            raise DatasetFormatError(
                f"{path}: expected an aligned CelebA image of {ALIGNED_SIZE[0]}x"
                f"{ALIGNED_SIZE[1]} (img_align_celeba), got {image.size[0]}x{image.size[1]}"
            )
        square = image.convert("RGB").crop((0, SQUARE_TOP, SQUARE, SQUARE_TOP + SQUARE))
        return square.resize((imwidth, imwidth), Image.BILINEAR)


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(0, 255).to(torch.uint8)  # truncation, like the original's cast


def _to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)


class CelebAFaces(Dataset):
    """Aligned faces [3, imwidth - 2·crop]² uint8 with their landmarks [5, 2] (x, y pixels).

    ``warper``: items are ``{"image", "prior_image"}`` uint8 pairs (warped at ``imwidth`` before
    the border crop; the warp's random draws come from torch's RNG, which the resumable loader
    seeds per batch); otherwise ``(image, 0)`` or, with ``landmarks_as_label``, ``(image,
    landmarks)``."""

    def __init__(
        self,
        image_dir: Path,
        names: Sequence[str],
        landmarks: np.ndarray,
        imwidth: int = 160,
        crop: int = 16,
        warper: TPSPairWarper | None = None,
        landmarks_as_label: bool = False,
    ) -> None:
        self.image_dir, self.names, self.raw_landmarks = image_dir, list(names), landmarks
        self.landmarks = torch.from_numpy(align_landmarks(landmarks, imwidth, crop))
        self.imwidth, self.crop, self.warper = imwidth, crop, warper
        self.landmarks_as_label = landmarks_as_label

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int) -> Any:
        image = load_aligned(self.image_dir / self.names[index], self.imwidth)
        c = self.crop
        if self.warper is not None:
            x, x_prior = self.warper(_to_tensor(image).float())
            return {"image": _to_uint8(x), "prior_image": _to_uint8(x_prior)}
        x = _to_tensor(image)
        if c:
            x = x[:, c:-c, c:-c]
        label = self.landmarks[index] if self.landmarks_as_label else torch.tensor(0)
        return x, label

    def without_augment(self) -> CelebAFaces:
        """The same faces un-warped, ``(image, 0)`` (FID reference statistics, latent cache)."""
        return CelebAFaces(self.image_dir, self.names, self.raw_landmarks, self.imwidth, self.crop)


class PairCollate:
    """Stack ``{"image", "prior_image"}`` items into a dict of float batches in [0, 1]."""

    def __call__(self, items: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        return {key: torch.stack([it[key] for it in items]).float().div_(255) for key in items[0]}


class LandmarkCollate:
    """Stack ``(uint8 image, landmarks)`` items into (float images in [0, 1], landmarks)."""

    def __call__(self, items: Sequence[tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, ...]:
        images = torch.stack([item[0] for item in items]).float().div_(255)
        return images, torch.stack([item[1] for item in items]).float()


class CelebAMAFLDataModule(ImageDataModule):
    """``celeba_mafl``: DLP's CelebA training set with TPS prior pairs, and MAFL landmarks.

    Train batches are ``{"image": x, "prior_image": x_prior}`` with ``prior_pairs`` (the original's
    ``use_tps=use_pairs=True`` for CelebA), else ``(x, 0)``; val / test batches ``(x, 0)``;
    :meth:`landmark_dataloader` ``(x, landmarks [B, 5, 2] (x, y) pixels)`` for MAFL "train" /
    "test" (``metrics=keypoint_regression``). ``download`` fetches the two MAFL lists only (CelebA
    itself is a manual download)."""

    def __init__(
        self,
        root: str,
        image_size: int = 128,
        imwidth: int = 160,
        image_dir: str | None = None,
        prior_pairs: bool = True,
        tps: dict[str, float] | None = None,
        val_size: int = 2000,
        download: bool = False,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("name", "celeba_mafl")
        kwargs.setdefault("image_shape", [3, image_size, image_size])
        kwargs.setdefault("flip", False)
        super().__init__(**kwargs)
        self.root = Path(root)
        self.imwidth, self.crop = imwidth, (imwidth - image_size) // 2
        square = (3, image_size, image_size)
        if self.imwidth - 2 * self.crop != image_size or self.image_shape != square:
            raise DatasetFormatError(
                f"celeba_mafl: image_size {image_size} must be imwidth {imwidth} minus an even "
                "border (the protocol: 160 - 2·16 = 128), with image_shape [3, size, size]"
            )
        self.image_dir = image_dir
        self.prior_pairs, self.tps = prior_pairs, dict(tps or {})
        self.val_size, self.download = val_size, download
        self.landmark_sets: dict[str, CelebAFaces] = {}

    # -- locating the files
    def _find(self, what: str, candidates: Sequence[str], expected: str, is_dir=False) -> Path:
        for candidate in candidates:
            path = self.root / candidate
            if path.is_dir() if is_dir else path.is_file():
                return path
        raise DatasetNotFoundError(
            f"CelebA/MAFL {what}",
            self.root / candidates[0],
            expected=expected + f" (also looked for {', '.join(candidates[1:])} under {self.root})",
            source=CELEBA_SOURCE,
        )

    def _mafl_list(self, split: str) -> Path:
        path = self.root / "MAFL" / f"{split}.txt"
        if not path.is_file() and (self.root / f"{split}.txt").is_file():
            return self.root / f"{split}.txt"
        if not path.is_file():
            if not self.download:
                raise DatasetNotFoundError(
                    f"MAFL {split} list",
                    path,
                    expected=f"MAFL/{split}.txt (one image name per line)",
                    source=f"{MAFL_URLS[split]} (or DVE's celeba.tar.gz)",
                    download_override="data.download=true",
                )
            download_url(MAFL_URLS[split], path, name=f"MAFL {split} list")
        return path

    def _image_dir(self) -> Path:
        if self.image_dir is not None:
            candidates = [self.image_dir]
        else:  # the original prefers DVE's higher-quality copy
            candidates = ["Img/img_align_celeba_hq", "Img/img_align_celeba", "img_align_celeba"]
        return self._find(
            "images", candidates, "the aligned 178x218 JPEGs (000001.jpg ...)", is_dir=True
        )

    # -- splits
    def build(self) -> dict[str, Dataset]:
        image_dir = self._image_dir()
        anno = self._find(
            "landmarks",
            ["Anno/list_landmarks_align_celeba.txt", "list_landmarks_align_celeba.txt"],
            "list_landmarks_align_celeba.txt",
        )
        partition_file = self._find(
            "partition",
            ["Eval/list_eval_partition.txt", "list_eval_partition.txt"],
            "list_eval_partition.txt",
        )
        names, landmarks = read_landmarks(anno)
        partition = read_eval_partition(partition_file)
        mafl = {split: read_name_list(self._mafl_list(split)) for split in ("training", "testing")}
        index = {name: i for i, name in enumerate(names)}
        for split, listed in mafl.items():
            missing = [name for name in listed if name not in index]
            if missing:
                raise DatasetFormatError(
                    f"MAFL {split}.txt lists {len(missing)} images without CelebA landmarks "
                    f"(first: {missing[0]}); the lists and {anno.name} do not belong together"
                )
        if set(names) != set(partition):
            raise DatasetFormatError(
                f"{partition_file} and {anno} list different images; use both from one CelebA copy"
            )
        in_mafl = set(mafl["training"]) | set(mafl["testing"])

        def subset(keep: Sequence[str], **kw: Any) -> CelebAFaces:
            order = sorted(index[n] for n in keep)  # CelebA file order, as the original
            chosen = [names[i] for i in order]
            return CelebAFaces(image_dir, chosen, landmarks[order], self.imwidth, self.crop, **kw)

        train = [n for n in names if partition[n] == 0 and n not in in_mafl]
        val = [n for n in names if partition[n] == 2 and n not in in_mafl][: self.val_size]
        warper = TPSPairWarper(self.imwidth, self.crop, **self.tps) if self.prior_pairs else None
        self.landmark_sets = {
            "train": subset(mafl["training"], landmarks_as_label=True),
            "test": subset(mafl["testing"], landmarks_as_label=True),
        }
        if not train or not val:
            raise DatasetFormatError(
                f"celeba_mafl: {len(train)} training and {len(val)} validation images after "
                f"removing the MAFL images; {partition_file} has no partition-0 or -2 images left"
            )
        return {
            "train": subset(train, warper=warper),
            "val": subset(val),
            "test": subset(mafl["testing"]),
        }

    # -- loaders
    def train_dataloader(self) -> DataLoader:
        if not self.prior_pairs:
            return super().train_dataloader()
        return resumable_loader(
            self._dataset("train"),
            self.batch_size,
            collate_fn=PairCollate(),
            seed=self.seed,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )

    def landmark_dataloader(self, split: str, batch_size: int = 100) -> DataLoader:
        """MAFL images (un-warped, in order) with landmarks [B, 5, 2] (x, y) pixels of the
        ``image_size`` image: ``split`` "train" (MAFL training) or "test" (MAFL testing)."""
        if split not in ("train", "test"):
            raise ValueError(f"landmark_dataloader: split must be 'train' or 'test', got {split!r}")
        self.setup()
        return DataLoader(
            self.landmark_sets[split],
            batch_size=batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            collate_fn=LandmarkCollate(),
        )

    def reference_info(self, split: str = "train") -> dict[str, Any]:
        return {**super().reference_info(split), "imwidth": self.imwidth, "crop": self.crop}
