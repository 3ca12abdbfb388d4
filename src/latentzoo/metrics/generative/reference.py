"""Reference statistics: the ``.npz`` format, computing them from a datamodule (cached by
settings), and reading foreign files (ADM's reference batches: ``mu``/``sigma`` and/or images in
``arr_0``).

Caching: the key holds the data description (``datamodule.reference_info``), the extractor id
and the number of images; a file whose metadata differs is recomputed and overwritten.
"""

from __future__ import annotations

import hashlib
import json
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from latentzoo.metrics.generative.imaging import batch_images
from latentzoo.metrics.generative.progress import dist_info, progress_bar
from latentzoo.utils.errors import LatentzooError
from latentzoo.utils.logging import RankedLogger

if TYPE_CHECKING:
    from latentzoo.metrics.generative.metric import GenerativeMetrics

log = RankedLogger(__name__, rank_zero_only=True)


class ReferenceStats:
    """mu, sigma (float64), count, metadata and optionally a float32 feature sample for KID."""

    def __init__(
        self,
        mu: np.ndarray,
        sigma: np.ndarray,
        count: int,
        meta: dict[str, Any] | None = None,
        features: np.ndarray | None = None,
    ) -> None:
        self.mu, self.sigma, self.count = mu, sigma, int(count)
        self.meta = meta or {}
        self.features = features

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        extra = {} if self.features is None else {"features": self.features.astype(np.float32)}
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(
            tmp,
            mu=self.mu,
            sigma=self.sigma,
            count=self.count,
            meta=json.dumps(self.meta, sort_keys=True),
            **extra,
        )
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> ReferenceStats:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data["meta"])) if "meta" in data else {}
            # a foreign file (e.g. ADM's reference batch) has no count: only mu and sigma matter
            count = int(data["count"]) if "count" in data else int(meta.get("num_images", 50_000))
            features = data.get("features")
            return cls(
                data["mu"].astype(np.float64),
                data["sigma"].astype(np.float64),
                count,
                meta,
                features,
            )


def settings_hash(settings: dict[str, Any]) -> str:
    return hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]


def _meta(metrics: GenerativeMetrics, info: dict[str, Any], num_images: int | None) -> dict:
    return {
        **info,
        "extractor": metrics.extractor_id,
        "resize": "tf1-bilinear-noaa",
        "num_images_requested": num_images,
        "uint8": "round",
    }


def _data_info(datamodule: Any, split: str) -> dict[str, Any]:
    if hasattr(datamodule, "reference_info"):
        return dict(datamodule.reference_info(split))
    return {
        "dataset": type(datamodule).__name__,
        "split": split,
        "image_shape": list(getattr(datamodule, "image_shape", [])),
    }


def _reference_loader(datamodule: Any, split: str, batch_size: int) -> Any:
    """This rank's un-augmented shard of ``split``: ``reference_dataloader`` when the datamodule
    has one (a latent cache delegates it to its source images), else ``<split>_dataloader``."""
    rank, world = dist_info()
    if hasattr(datamodule, "reference_dataloader"):
        return datamodule.reference_dataloader(
            split, batch_size=batch_size, rank=rank, world_size=world
        )
    if hasattr(datamodule, "setup"):
        datamodule.setup("fit")
    log.warning(
        f"{type(datamodule).__name__} has no reference_dataloader; using its "
        f"{split}_dataloader (may be augmented or drop the last batch)"
    )
    return getattr(datamodule, f"{split}_dataloader")()


def reference_stats(
    metrics: GenerativeMetrics,
    datamodule: Any,
    split: str = "train",
    num_images: int | None = None,
    batch_size: int = 100,
    stats_dir: str | Path | None = None,
    path: str | Path | None = None,
) -> ReferenceStats:
    """Cached reference statistics of ``datamodule``'s ``split``; computed and saved on a miss.

    ``path`` names the file explicitly: a foreign file without metadata (ADM's reference batch
    with ``mu``/``sigma``, or images in ``arr_0``) is used as it is, see :func:`read_foreign`.
    """
    if path is not None and Path(path).is_file() and _is_foreign(path):
        return read_foreign(metrics, path, batch_size)
    info = _data_info(datamodule, split)
    meta = _meta(metrics, info, num_images)
    if path is None:
        if stats_dir is None:
            raise LatentzooError("reference_stats needs stats_dir or path")
        name = f"{info.get('dataset', 'data')}-{split}-{(info.get('image_shape') or ['?'])[-1]}px"
        path = Path(stats_dir, f"{name}-{settings_hash(meta)}.npz")
    path = Path(path)
    if path.is_file():
        stats = ReferenceStats.load(path)
        stored = {k: v for k, v in stats.meta.items() if k not in ("num_images", "seconds")}
        # a cache without a feature sample (written with kid=false) cannot serve KID/k-NN
        if stored == meta and (stats.features is not None or not metrics.keeps_features):
            log.info(f"FID reference: cache hit {path} ({stats.count} images)")
            return stats
        changed = sorted(k for k in set(stored) | set(meta) if stored.get(k) != meta.get(k))
        log.info(f"FID reference: {path} has other settings ({', '.join(changed)}); recomputing")
    loader = _reference_loader(datamodule, split, batch_size)
    rank, world = dist_info()
    limit = None if num_images is None else -(-num_images // world)
    started, seen = time.perf_counter(), 0
    with progress_bar() as progress:
        total = limit or (-(-info["split_size"] // world) if "split_size" in info else None)
        task = progress.add_task(f"FID reference {info.get('dataset')}/{split}", total=total)
        for batch in loader:
            images = batch_images(batch)
            if limit is not None:
                images = images[: limit - seen]
            metrics.add_real(images)
            seen += images.shape[0]
            progress.update(task, advance=images.shape[0])
            if limit is not None and seen >= limit:
                break
    stats = metrics.reference({**meta})
    stats.meta.update(num_images=stats.count, seconds=round(time.perf_counter() - started, 1))
    if rank == 0:
        stats.save(path)
        log.info(f"FID reference: {stats.count} images -> {path}")
    return stats


# --------------------------------------------------------------------------- foreign files


def _is_foreign(path: str | Path) -> bool:
    """A file we did not write (no ``meta``): ADM's reference batches, sample batches."""
    with np.load(path, allow_pickle=False) as data:
        return "meta" not in data.files


def read_foreign(metrics: GenerativeMetrics, path: str | Path, batch_size: int) -> ReferenceStats:
    """Statistics of an ADM-style ``.npz``: ``mu``/``sigma`` as given (float64), and when the
    file holds uint8 NHWC images in ``arr_0`` (an ADM reference batch holds 10k of them) their
    features: all statistics if there are no ``mu``/``sigma``, else only KID's sample."""
    with np.load(path, allow_pickle=False) as data:
        keys = set(data.files)
    has_stats, has_images = {"mu", "sigma"} <= keys, "arr_0" in keys
    if not (has_stats or has_images):
        raise LatentzooError(
            f"FID reference {path} holds {sorted(keys)}; expected mu and sigma (e.g. ADM's "
            "reference batch) or uint8 NHWC images in arr_0"
        )
    if has_stats and (not metrics.keeps_features or not has_images):
        log.info(f"FID reference: {path} (mu, sigma as given)")
        return ReferenceStats.load(path)
    log.info(f"FID reference: features of the arr_0 images in {path}")
    rank, world = dist_info()
    for index, images in enumerate(iter_npz_images(path, batch_size)):
        if index % world == rank:
            metrics.add_real(torch.from_numpy(images).permute(0, 3, 1, 2))
    computed = metrics.reference({"source": str(path)})
    if not has_stats:
        return computed
    given = ReferenceStats.load(path)
    given.features = computed.features
    return given


def iter_npz_images(path: str | Path, batch_size: int, key: str = "arr_0") -> Iterator[np.ndarray]:
    """uint8 NHWC batches of ``key`` in an ``.npz``, streamed from the zip member (an ADM
    batch of 50k 256² images is 9.8 GB: never loaded whole)."""
    with zipfile.ZipFile(path) as archive, archive.open(f"{key}.npy") as file:
        major, _ = np.lib.format.read_magic(file)
        read_header = (
            np.lib.format.read_array_header_1_0
            if major == 1
            else np.lib.format.read_array_header_2_0
        )
        shape, fortran, dtype = read_header(file)
        if dtype != np.uint8 or fortran or len(shape) != 4 or shape[-1] not in (1, 3):
            raise LatentzooError(
                f"{path}:{key} is {dtype} {shape}; expected C-ordered uint8 [N, H, W, 1 or 3]"
            )
        per_image = int(np.prod(shape[1:]))
        for start in range(0, shape[0], batch_size):
            n = min(batch_size, shape[0] - start)
            yield np.frombuffer(file.read(n * per_image), np.uint8).reshape(n, *shape[1:])
