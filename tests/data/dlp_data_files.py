"""Small DLP datasets written in their published on-disk formats (for tests and CLI runs).

CelebA / MAFL: the official tree (``Img/img_align_celeba/*.jpg`` 178 x 218, ``Anno/
list_landmarks_align_celeba.txt``, ``Eval/list_eval_partition.txt``, ``MAFL/training.txt`` /
``testing.txt``), with a bright 5 x 5 dot at each landmark so that keypoints have something
to find. CLEVRER / Traffic: the original's one uint8 array [N, 128, 128, 3] (``.npy``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from latentzoo.data.celeba_mafl import LANDMARK_COLUMNS

# the first rows of CelebA's list_landmarks_align_celeba.txt (their column spacing)
MEAN_FACE = np.array([[69, 109], [106, 113], [77, 142], [73, 152], [108, 154]], dtype=float)


def write_celeba(
    root: Path,
    n: int = 40,
    partition: tuple[int, int, int] = (24, 8, 8),
    mafl_train: tuple[int, ...] = (1, 3, 5, 7, 9, 11, 13, 15, 25, 27, 33, 35),
    mafl_test: tuple[int, ...] = (2, 26, 34, 36),
    seed: int = 0,
) -> dict[str, list[str]]:
    """Write ``n`` images (names 000001.jpg ...; ``partition`` images per CelebA split) and the
    MAFL lists (1-based image numbers; the lists are written in a shuffled order, as MAFL's).
    Returns the names per list."""
    rng = np.random.default_rng(seed)
    names = [f"{i:06d}.jpg" for i in range(1, n + 1)]
    images = root / "Img" / "img_align_celeba"
    images.mkdir(parents=True, exist_ok=True)
    landmarks = np.rint(MEAN_FACE + rng.normal(0, 4, (n, 5, 2))).astype(int)
    for name, points in zip(names, landmarks, strict=True):
        pixels = np.full((218, 178, 3), 40, dtype=np.uint8)
        pixels += rng.integers(0, 20, pixels.shape, dtype=np.uint8)
        for x, y in points:
            pixels[y - 2 : y + 3, x - 2 : x + 3] = 255
        Image.fromarray(pixels).save(images / name, quality=95)
    (root / "Anno").mkdir(exist_ok=True)
    rows = [
        f"{name} " + " ".join(f"{v:4d}" for v in lm.reshape(-1))
        for name, lm in zip(names, landmarks, strict=True)
    ]
    header = [str(n), " ".join(LANDMARK_COLUMNS)]
    (root / "Anno" / "list_landmarks_align_celeba.txt").write_text("\n".join(header + rows) + "\n")
    split = [0] * partition[0] + [1] * partition[1] + [2] * partition[2]
    (root / "Eval").mkdir(exist_ok=True)
    lines = [f"{name} {p}" for name, p in zip(names, split, strict=True)]
    (root / "Eval" / "list_eval_partition.txt").write_text("\n".join(lines) + "\n")
    (root / "MAFL").mkdir(exist_ok=True)
    lists = {}
    for file, numbers in (("training", mafl_train), ("testing", mafl_test)):
        listed = [names[i - 1] for i in rng.permutation(numbers)]
        (root / "MAFL" / f"{file}.txt").write_text("\n".join(listed) + "\n")
        lists[file] = listed
    return lists


def write_frames(path: Path, n: int, size: int = 128, seed: int = 0) -> np.ndarray:
    """The DLP frames array: ``n`` frames of a few coloured squares, uint8 [n, size, size, 3]."""
    rng = np.random.default_rng(seed)
    frames = np.zeros((n, size, size, 3), dtype=np.uint8)
    for frame in frames:
        for _ in range(3):
            y, x = rng.integers(0, size - size // 8, 2)
            frame[y : y + size // 8, x : x + size // 8] = rng.integers(64, 256, 3)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, frames)
    return frames
