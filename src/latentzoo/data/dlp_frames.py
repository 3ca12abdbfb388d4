"""Write the frames arrays that DLP's CLEVRER and Traffic loaders read (one uint8 ``.npy``
[N, 128, 128, 3]), from folders of extracted frames, as the original's ``prepare_numpy_file``:

- **clevrer**: one sub-folder of frame images per video (e.g. ``ffmpeg -i video_00000.mp4
  video_00000/%03d.png``), videos in sorted order, frames by the integer at the end of their
  name; keep frames numbered above ``start_frame`` (26), then every ``frameskip``-th (3) of
  each video; resize to 128 x 128 bicubic (no crop).
- **traffic**: one folder of frames named by their integer index; every ``frameskip``-th (3);
  crop the box (60, 0, 480, 420); resize to 128 x 128 bicubic.

    python -m latentzoo.data.dlp_frames clevrer <frames_dir> <out.npy>
    python -m latentzoo.data.dlp_frames traffic <frames_dir> <out.npy>
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from latentzoo.data.datasets.download import publish_file
from latentzoo.utils.errors import LatentzooError

__all__ = ["clevrer_frame_list", "frame_number", "traffic_frame_list", "write_frames_array"]

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".gif"}
TRAFFIC_CROP = (60, 0, 480, 420)  # PIL box (left, top, right, bottom) of the original


def frame_number(path: Path) -> int:
    """The integer at the end of a frame's file name (``video_00012_027.png`` -> 27)."""
    match = re.search(r"(\d+)$", path.stem)
    if match is None:
        raise LatentzooError(f"{path}: a frame file name must end with its frame number")
    return int(match.group(1))


def _frames(folder: Path) -> list[Path]:
    found = [p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES]
    return sorted(found, key=frame_number)


def clevrer_frame_list(root: Path, start_frame: int = 26, frameskip: int = 3) -> list[Path]:
    """Per video folder (sorted): frames numbered above ``start_frame``, every ``frameskip``-th."""
    videos = sorted(p for p in root.iterdir() if p.is_dir())
    if not videos:
        raise LatentzooError(f"{root}: expected one folder of extracted frames per video")
    out = []
    for video in videos:
        kept = [p for p in _frames(video) if frame_number(p) > start_frame]
        out += kept[::frameskip]
    return out


def traffic_frame_list(root: Path, frameskip: int = 3) -> list[Path]:
    """The frames of one folder in index order, every ``frameskip``-th."""
    return _frames(root)[::frameskip]


def write_frames_array(
    paths: Sequence[Path], out: Path, size: int = 128, crop: tuple[int, ...] | None = None
) -> Path:
    """RGB, optional crop box, bicubic resize to ``size``; saved atomically as uint8 .npy."""
    if not paths:
        raise LatentzooError(f"no frames to write to {out}")
    frames = np.empty((len(paths), size, size, 3), dtype=np.uint8)
    for i, path in enumerate(tqdm(paths, desc=out.name, unit="frame")):
        with Image.open(path) as image:
            image = image.convert("RGB")
            if crop is not None:
                image = image.crop(crop)
            frames[i] = np.asarray(image.resize((size, size), Image.BICUBIC))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.part.npy")
    np.save(tmp, frames)
    publish_file(tmp, out)
    return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m latentzoo.data.dlp_frames")
    parser.add_argument("dataset", choices=["clevrer", "traffic"])
    parser.add_argument("frames_dir", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--frameskip", type=int, default=3)
    parser.add_argument("--start-frame", type=int, default=26, help="clevrer only")
    args = parser.parse_args(argv)
    if args.dataset == "clevrer":
        paths = clevrer_frame_list(args.frames_dir, args.start_frame, args.frameskip)
        write_frames_array(paths, args.out, args.size)
    else:
        paths = traffic_frame_list(args.frames_dir, args.frameskip)
        write_frames_array(paths, args.out, args.size, TRAFFIC_CROP)
    print(f"wrote {len(paths)} frames to {args.out}")


if __name__ == "__main__":
    main()
