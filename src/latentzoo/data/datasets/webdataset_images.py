"""Webdataset tar shards of images (+ optional ``cls`` labels) as an iterable pipeline.

Shards are split across DDP ranks (``wds.split_by_node``) and then across the DataLoader workers
of each rank (``wds.split_by_worker``), so a finite pass sees every sample exactly once. URLs
are brace patterns of local files (``/data/ffhq/train-{000000..000069}.tar``), any URL webdataset
opens, or ``pipe:`` commands (``pipe:aws s3 cp s3://bucket/shard-{0000..0099}.tar -``).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import webdataset as wds
from braceexpand import braceexpand
from PIL import Image

from latentzoo.data.datasets.image_folder import load_image

__all__ = ["expand_shards", "image_pipeline", "local_shards_missing"]

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")


def expand_shards(urls: str | Sequence[str]) -> list[str]:
    """Brace-expand one pattern, a ``::``-separated list of patterns, or a list of them."""
    patterns = [urls] if isinstance(urls, str) else list(urls)
    out: list[str] = []
    for pattern in patterns:
        for part in str(pattern).split("::"):
            out.extend(braceexpand(part))
    return out


def local_shards_missing(shards: Sequence[str]) -> list[str]:
    """The shards that name local files which do not exist (``pipe:``/remote URLs are skipped)."""
    missing = []
    for shard in shards:
        if shard.startswith("pipe:") or "://" in shard and not shard.startswith("file://"):
            continue
        path = Path(shard.removeprefix("file://"))
        if not path.is_file():
            missing.append(str(path))
    return missing


class _Decode:
    """Sample dict -> ``(uint8 [3, S, S], label)``; picklable for DataLoader workers."""

    def __init__(
        self,
        image_size: int,
        resize: str,
        interpolation: str,
        image_keys: Sequence[str],
        label_key: str | None,
        with_keys: bool = False,
    ) -> None:
        self.image_size = image_size
        self.resize = resize
        self.interpolation = interpolation
        self.image_keys = tuple(image_keys)
        self.label_key = label_key
        self.with_keys = with_keys

    def __call__(self, sample: dict[str, Any]) -> tuple[Any, ...]:
        key = next((k for k in self.image_keys if k in sample), None)
        if key is None:
            raise KeyError(
                f"sample {sample.get('__key__')!r} in {sample.get('__url__')!r} has no image "
                f"under {self.image_keys}; its keys are {sorted(sample)}"
            )
        with Image.open(io.BytesIO(sample[key])) as image:
            pixels = load_image(image, self.image_size, self.resize, self.interpolation)
        label = 0
        if self.label_key and self.label_key in sample:
            raw = sample[self.label_key]
            label = int(raw.decode() if isinstance(raw, bytes) else raw)
        label = torch.tensor(label, dtype=torch.int64)
        return (pixels, label, sample["__key__"]) if self.with_keys else (pixels, label)


def image_pipeline(
    urls: str | Sequence[str],
    *,
    image_size: int,
    train: bool,
    resize: str = "center_crop",
    interpolation: str = "bicubic",
    shuffle_buffer: int = 1000,
    shard_shuffle: int = 100,
    seed: int | None = None,
    image_keys: Sequence[str] = IMAGE_KEYS,
    label_key: str | None = "cls",
    with_keys: bool = False,
) -> wds.WebDataset:
    """Pipeline of ``(uint8 image, label)`` (or ``(image, label, __key__)`` with ``with_keys``).

    ``seed``: fixes the shard and sample shuffles (``None``: fresh per run and per epoch).
    ``train``: shards and samples are shuffled and the shard list repeats forever (the loader's
    ``with_epoch`` fixes the epoch length, so every rank yields the same number of batches).
    Otherwise one ordered pass over this rank's and worker's shards.
    """
    decode = _Decode(image_size, resize, interpolation, image_keys, label_key, with_keys)
    dataset = wds.WebDataset(
        expand_shards(urls),
        shardshuffle=shard_shuffle if train else False,
        repeat=train,
        nodesplitter=wds.split_by_node,
        workersplitter=wds.split_by_worker,
        empty_check=False,  # a worker may get no shard when shards < ranks x workers
        seed=seed,
    )
    if train and shuffle_buffer > 0:
        dataset = dataset.shuffle(shuffle_buffer, seed=seed)
    return dataset.map(decode)
