"""FID / KID (and k-NN precision, recall, density, coverage) between two image sets.

    latentzoo-fid real_images/ samples.npz                 # FID + KID
    latentzoo-fid real_images/ samples/ --prd              # + precision/recall, density/coverage
    latentzoo-fid real_images/ --save-stats real.npz       # statistics, for later runs
    latentzoo-fid real.npz samples/ --device cuda
    python -m latentzoo.fid A B ...

A and B are image folders (png, jpg, ...; searched recursively, one image size per folder),
``.npz`` files of uint8 NHWC images in ``arr_0`` (what ``eval.py save_samples=npz`` and ADM
write) or statistics (``--save-stats`` output, eval.py's FID cache, or any ``mu``/``sigma``
file such as ADM's reference batches). A is the reference side.

It runs eval.py's own FID code (:class:`latentzoo.metrics.generative.GenerativeMetrics`): uint8
by rounding, the TF1 bilinear resize to 299 without antialias, the 2015-12-05 TF Inception pool3
features, TF32 off, float64 statistics; so the same images give the same numbers here and in
``eval.py metrics=fid``. KID and the k-NN metrics use a uniform sample of at most
``--max-features`` reference features and the first ``--max-features`` of B.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from latentzoo.utils.errors import LatentzooError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".ppm"}


class _ImageFiles(torch.utils.data.Dataset):
    """Decoded images as uint8 ``[3, H, W]``; a file that fails to decode yields its error."""

    def __init__(self, files: list[Path]) -> None:
        self.files = files

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[Path, torch.Tensor | str]:
        from PIL import Image

        path = self.files[index]
        try:
            with Image.open(path) as image:
                array = np.asarray(image.convert("RGB"))  # grey -> repeated, alpha dropped
        except Exception as error:  # reported by the main process, naming the file
            return path, f"{type(error).__name__}: {error}"
        return path, torch.from_numpy(array.copy()).permute(2, 0, 1)


@dataclass
class Source:
    """One side: an image folder, an ``.npz`` of images, or saved statistics."""

    path: Path
    kind: str  # folder | npz_images | stats
    count: int
    files: list[Path] | None = None
    stats: Any = None  # ReferenceStats for kind == stats

    @property
    def description(self) -> str:
        what = {"folder": "image folder", "npz_images": "images in .npz", "stats": "statistics"}
        return f"{self.path} ({what[self.kind]}, {self.count} images)"


def open_source(path: str | Path) -> Source:
    """Classify ``path`` without reading its images."""
    from latentzoo.metrics.generative.reference import ReferenceStats

    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise LatentzooError(
                f"{path} holds no images (searched recursively for "
                f"{', '.join(sorted(IMAGE_SUFFIXES))})"
            )
        return Source(path, "folder", len(files), files=files)
    if not path.is_file():
        raise LatentzooError(f"{path} does not exist; give an image folder or an .npz file")
    if path.suffix != ".npz":
        raise LatentzooError(f"{path} is neither an image folder nor an .npz file")
    try:
        with np.load(path, allow_pickle=False) as data:
            keys = set(data.files)
            shape = data["arr_0"].shape if "arr_0" in keys and not {"mu", "sigma"} <= keys else None
    except (OSError, ValueError) as error:
        raise LatentzooError(f"{path} is not a readable .npz ({error})") from error
    if {"mu", "sigma"} <= keys:
        stats = ReferenceStats.load(path)
        return Source(path, "stats", stats.count, stats=stats)
    if shape is not None:
        return Source(path, "npz_images", int(shape[0]))
    raise LatentzooError(
        f"{path} holds {sorted(keys)}; expected uint8 NHWC images in arr_0, or mu and sigma"
    )


def iter_batches(source: Source, batch_size: int, num_workers: int) -> Iterator[torch.Tensor]:
    """uint8 ``[N, 3, H, W]`` batches of an image source, in file order."""
    if source.kind == "npz_images":
        from latentzoo.metrics.generative.reference import iter_npz_images

        for images in iter_npz_images(source.path, batch_size):
            yield torch.from_numpy(images.copy()).permute(0, 3, 1, 2)
        return
    loader = torch.utils.data.DataLoader(
        _ImageFiles(source.files or []),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=list,  # sizes are checked here, so a mismatch is one clear error
    )
    size = None
    for items in loader:
        for path, image in items:
            if isinstance(image, str):
                raise LatentzooError(f"cannot read image {path}: {image}")
            if size is None:
                size = (image.shape[1:], path)
            elif image.shape[1:] != size[0]:
                raise LatentzooError(
                    f"images of one set must share a size: {path} is {tuple(image.shape[1:])}, "
                    f"{size[1]} is {tuple(size[0])}; resize them first"
                )
        yield torch.stack([image for _, image in items])


def _check_stats(source: Source, metrics) -> None:
    """Statistics must come from the extractor in use (ours name it; foreign files only have a
    feature dimension to check)."""
    made_by = source.stats.meta.get("extractor")
    if made_by and made_by != metrics.extractor_id:
        raise LatentzooError(
            f"{source.path} was computed with {made_by}, this run uses {metrics.extractor_id}; "
            "recompute it with the same extractor"
        )
    if source.stats.mu.shape[-1] != metrics.kid_features_dim:
        raise LatentzooError(
            f"{source.path} has {source.stats.mu.shape[-1]}-d statistics, the extractor "
            f"{metrics.extractor_id} gives {metrics.kid_features_dim}-d features"
        )


def _feed(metrics, source: Source, real: bool, batch_size: int, workers: int, progress) -> None:
    """Put ``source`` into the reference (``real``) or generated side of ``metrics``."""
    if source.kind == "stats":
        (metrics.set_reference if real else metrics.set_fake)(source.stats)
        return
    side = "A" if real else "B"
    task = progress.add_task(f"features of {side}", total=source.count)
    seen = 0
    for images in iter_batches(source, batch_size, workers):
        if real:
            metrics.add_real(images)
        else:
            metrics.add_fake(images, range(seen, seen + len(images)))
        seen += len(images)
        progress.update(task, advance=len(images))


def compute(
    a: str | Path,
    b: str | Path | None = None,
    *,
    save_stats: str | Path | None = None,
    prd: bool = False,
    kid: bool = True,
    device: str | None = None,
    batch_size: int = 50,
    num_workers: int = 4,
    extractor: str = "inception",
    weights_path: str | None = None,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    prd_k: int = 3,
    dc_k: int = 5,
    max_features: int = 10_000,
) -> dict[str, Any]:
    """The metrics of B against A (or, with ``save_stats`` and no B, A's statistics)."""
    from latentzoo.metrics.generative import (
        GenerativeMetrics,
        build_feature_extractor,
        progress_bar,
    )

    if (b is None) == (save_stats is None):
        raise LatentzooError("give two sets (A B), or one set and --save-stats OUT.npz")
    sources = [open_source(a)] + ([open_source(b)] if b is not None else [])
    if save_stats is not None and sources[0].kind == "stats":
        raise LatentzooError(f"{a} already holds statistics; --save-stats needs images")
    notes = []
    bare = [s for s in sources if s.kind == "stats" and s.stats.features is None]
    if bare and prd:
        raise LatentzooError(
            f"{bare[0].path} holds only mu and sigma; --prd needs features: give its images, or "
            "statistics written by --save-stats"
        )
    if bare and kid and b is not None:
        kid = False
        notes.append(f"KID skipped: {bare[0].path} holds only mu and sigma")
    subset = kid_subset_size
    if b is not None and kid:
        # KID's subsets come from the reference sample and from B: no larger than either
        sizes = [len(s.stats.features) if s.kind == "stats" else s.count for s in sources]
        subset = min(kid_subset_size, max_features, *sizes)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise LatentzooError(f"--device {device}: no CUDA device here; use --device cpu")
    metrics = GenerativeMetrics(
        extractor=build_feature_extractor(extractor, weights_path, weights_option="--weights "),
        kid=kid,
        kid_subsets=kid_subsets,
        kid_subset_size=subset,
        kid_reference_size=max_features,
        device=device,
        prd=prd,
        prd_k=prd_k,
        dc_k=dc_k,
        prd_num_samples=max_features,
    )
    for source in sources:
        if source.kind == "stats":
            _check_stats(source, metrics)
    out: dict[str, Any] = {
        "a": sources[0].description,
        "extractor": metrics.extractor_id,
        "device": str(metrics.device),
        "notes": notes,
    }
    with progress_bar() as progress:
        _feed(metrics, sources[0], True, batch_size, num_workers, progress)
        if b is not None:
            _feed(metrics, sources[1], False, batch_size, num_workers, progress)
    if save_stats is not None:
        meta = {
            "source": str(Path(a).resolve()),
            "extractor": metrics.extractor_id,
            "resize": "tf1-bilinear-noaa",
            "uint8": "round",
        }
        stats = metrics.reference(meta)
        stats.meta["num_images"] = stats.count
        stats.save(save_stats)
        return {**out, "saved": str(save_stats), "count": stats.count}
    out["b"] = sources[1].description
    if kid:
        out["kid_subset_size"] = subset
        out["kid_subsets"] = kid_subsets
    return {**out, **metrics.compute()}


def format_report(result: dict[str, Any], prd_k: int, dc_k: int) -> str:
    lines = [f"A: {result['a']}"]
    if "saved" in result:
        return "\n".join(
            lines
            + [f"statistics of {result['count']} images -> {result['saved']}"]
            + [f"extractor: {result['extractor']} on {result['device']}"]
        )
    lines += [f"B: {result['b']}", f"extractor: {result['extractor']} on {result['device']}"]
    lines += result.get("notes", [])
    lines.append(f"FID        {result['fid']:.4f}")
    if "kid_mean" in result:
        lines.append(
            f"KID        {result['kid_mean']:.6f} ± {result['kid_std']:.6f} "
            f"({result['kid_subsets']} subsets of {result['kid_subset_size']})"
        )
    if "precision" in result:
        lines.append(
            f"precision  {result['precision']:.4f}   recall    {result['recall']:.4f} (k={prd_k})"
        )
        lines.append(
            f"density    {result['density']:.4f}   coverage  {result['coverage']:.4f} (k={dc_k})"
        )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="latentzoo-fid",
        description="FID and KID (with --prd: precision/recall, density/coverage) of image set B "
        "against reference A, with eval.py's FID protocol.",
    )
    parser.add_argument("a", help="reference: image folder, .npz of images (arr_0) or statistics")
    parser.add_argument(
        "b", nargs="?", help="generated: image folder, .npz of images or statistics"
    )
    parser.add_argument(
        "--save-stats", metavar="OUT.npz", help="write A's statistics (give only A)"
    )
    parser.add_argument(
        "--prd",
        action="store_true",
        help="also precision/recall (Kynkäänniemi et al. 2019) and density/coverage (Naeem et al. "
        "2020) on the same features",
    )
    parser.add_argument("--no-kid", action="store_true", help="FID only")
    parser.add_argument("--device", help="cuda, cuda:1, cpu, ... (default: cuda if available)")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--num-workers", type=int, default=4, help="image decoding processes")
    parser.add_argument(
        "--extractor",
        default="inception",
        choices=("inception", "tiny"),
        help="tiny: a small fixed net for tests (numbers not comparable)",
    )
    parser.add_argument(
        "--weights",
        metavar="PATH",
        help="Inception weights (torch-fidelity .pth or TorchScript .pt)",
    )
    parser.add_argument("--kid-subsets", type=int, default=100)
    parser.add_argument(
        "--kid-subset-size", type=int, default=1000, help="lowered to the smaller set's size"
    )
    parser.add_argument("--prd-k", type=int, default=3, help="k of precision/recall")
    parser.add_argument("--dc-k", type=int, default=5, help="k of density/coverage")
    parser.add_argument(
        "--max-features", type=int, default=10_000, help="features per side for KID and --prd"
    )
    parser.add_argument("--json", metavar="PATH", help="also write the numbers as JSON")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = compute(
            args.a,
            args.b,
            save_stats=args.save_stats,
            prd=args.prd,
            kid=not args.no_kid,
            device=args.device,
            batch_size=args.batch_size,
            num_workers=args.num_workers,
            extractor=args.extractor,
            weights_path=args.weights,
            kid_subsets=args.kid_subsets,
            kid_subset_size=args.kid_subset_size,
            prd_k=args.prd_k,
            dc_k=args.dc_k,
            max_features=args.max_features,
        )
    except LatentzooError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(format_report(result, args.prd_k, args.dc_k))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
