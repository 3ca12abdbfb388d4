"""Webdataset tar shards of images (+ optional ``cls`` labels) as an iterable pipeline.

Shards are split across DDP ranks (``wds.split_by_node``) and then across the DataLoader workers
of each rank (``wds.split_by_worker``), so a finite pass sees every sample exactly once. URLs
are brace patterns of local files (``/data/ffhq/train-{000000..000069}.tar``), any URL webdataset
opens, or ``pipe:`` commands (``pipe:aws s3 cp s3://bucket/shard-{0000..0099}.tar -``).
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import webdataset as wds
from braceexpand import braceexpand
from PIL import Image

from latentzoo.data.datasets.errors import BadSampleError, bad_sample
from latentzoo.data.datasets.image_folder import BAD_IMAGE_ERRORS, describe_bad_image, load_image

__all__ = ["OnBadSample", "expand_shards", "image_pipeline", "local_shards_missing"]

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
        path = _local_path(shard)
        if path is not None and not path.is_file():
            missing.append(str(path))
    return missing


def _local_path(shard: str) -> Path | None:
    if shard.startswith("pipe:") or "://" in shard and not shard.startswith("file://"):
        return None
    return Path(shard.removeprefix("file://"))


def shard_problem(path: Path) -> str | None:
    """Why a local tar shard is cut short, or None. A complete tar ends with two zero 512-byte
    blocks; Python's tarfile silently stops at a truncated member, so this is checked up front."""
    size = path.stat().st_size
    if size == 0:
        return "the file is empty (0 bytes)"
    if size % 512:
        return f"truncated tar shard ({size} bytes, not a whole number of 512-byte blocks)"
    with path.open("rb") as file:
        file.seek(max(0, size - 1024))
        tail = file.read()
    if len(tail) < 1024 or tail.strip(b"\0"):
        return "truncated tar shard (no end-of-archive blocks)"
    return None


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
            raise bad_sample(
                f"{sample.get('__url__')} (sample {sample.get('__key__')})",
                f"no image under {self.image_keys} (its keys: {sorted(sample)}); the shard "
                "may be cut short or written without images",
            )
        source = f"{sample.get('__url__')} (sample {sample.get('__key__')}.{key})"
        try:
            with Image.open(io.BytesIO(sample[key])) as image:
                pixels = load_image(image, self.image_size, self.resize, self.interpolation)
        except BAD_IMAGE_ERRORS as error:
            raise bad_sample(source, describe_bad_image(None, error)) from error
        label = 0
        if self.label_key and self.label_key in sample:
            raw = sample[self.label_key]
            try:
                label = int(raw.decode() if isinstance(raw, bytes) else raw)
            except (ValueError, UnicodeDecodeError) as error:
                raise bad_sample(source, f"label .{self.label_key} is not an integer") from error
        label = torch.tensor(label, dtype=torch.int64)
        return (pixels, label, sample["__key__"]) if self.with_keys else (pixels, label)


class OnBadSample:
    """Webdataset handler: a corrupt shard or sample raises :class:`BadSampleError` naming it
    (``log`` None), or is recorded in ``log`` and skipped (``data.on_bad_sample=skip``; a
    damaged tar loses the rest of that shard). Picklable for DataLoader workers."""

    def __init__(self, log: Any | None = None) -> None:
        self.log = log

    def __call__(self, error: Exception) -> bool:
        if isinstance(error, BadSampleError) and hasattr(error, "source"):
            failure = error
        elif isinstance(error, tarfile.TarError | OSError | EOFError):
            # webdataset appends the shard's url to the args of a tar error
            strings = [a for a in error.args[1:] if isinstance(a, str)]
            url = strings[-1] if strings else "a shard"
            detail = error.args[0] if error.args else error
            what = (
                "damaged or truncated tar shard"
                if isinstance(error, tarfile.TarError)
                else ("cannot read it")
            )
            failure = bad_sample(url, f"{what} ({type(error).__name__}: {detail})")
        else:  # not a data problem: a bug, let it surface
            raise error
        if self.log is None:
            if failure is error:
                raise failure
            raise failure from error
        self.log.add(failure.source, failure.what)
        return True


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
    bad_samples: Any | None = None,
) -> wds.WebDataset:
    """Pipeline of ``(uint8 image, label)`` (or ``(image, label, __key__)`` with ``with_keys``).

    ``seed``: fixes the shard and sample shuffles (``None``: fresh per run and per epoch).
    ``train``: shards and samples are shuffled and the shard list repeats forever (the loader's
    ``with_epoch`` fixes the epoch length, so every rank yields the same number of batches).
    Otherwise one ordered pass over this rank's and worker's shards.
    ``bad_samples``: a :class:`~latentzoo.data.bad_samples.BadSampleLog` to skip corrupt
    shards/samples into; None raises :class:`BadSampleError` naming the first one.
    """
    decode = _Decode(image_size, resize, interpolation, image_keys, label_key, with_keys)
    handler = OnBadSample(bad_samples)
    shards = []
    for shard in expand_shards(urls):
        path = _local_path(shard)
        problem = shard_problem(path) if path is not None and path.is_file() else None
        if problem is None:
            shards.append(shard)
        elif bad_samples is None:
            raise bad_sample(shard, problem)
        else:
            bad_samples.add(shard, problem)
    dataset = wds.WebDataset(
        shards,
        shardshuffle=shard_shuffle if train else False,
        repeat=train,
        nodesplitter=wds.split_by_node,
        workersplitter=wds.split_by_worker,
        empty_check=False,  # a worker may get no shard when shards < ranks x workers
        seed=seed,
        handler=handler,
    )
    if train and shuffle_buffer > 0:
        dataset = dataset.shuffle(shuffle_buffer, seed=seed)
    return dataset.map(decode, handler=handler)
