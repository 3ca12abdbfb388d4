"""Transformation sequences x_0..x_S under a transformation k (latent_flow; Song et al. 2023).

``shared/specs/latent_flow.md`` §7 and ``datasets.md`` §0. A :class:`SequenceDataset` is a
*source* of sequences: it has K named transformations, a set of start items per split, and renders
``(k, start)`` pairs as a batch dict

- ``frames`` float32 (B, S+1, C, H, W) in [0, 1], frame t being the start moved t steps along k;
- ``k`` int64 (B,);
- ``factors`` int64 (B, S+1, F): the factor classes of every frame, columns ``factor_names``.
  Transformation k changes only column ``transform_factors[k]``, by one step per frame.

Two kinds:

- :class:`FactorSequences` on a ground-truth :class:`FactorDataset` (3D Shapes, Falcor3D, Isaac3D,
  proc_dsprites, ...): transformation k steps factor ``transform_factors[k]`` by ``+1`` class per
  frame while every other factor stays fixed; the start class of the stepped factor is uniform in
  ``[0, size - 1 - S]`` so the path stays on the grid, the other factors are uniform ([LZ]; no
  mod-trick indexing, no carries). Frames are gathered with one batched ``images_of`` call.
  Seeded random fractions of the grid cells are reserved as start configurations of the test
  split (``eval_holdout``) and, disjoint from them, of the validation split (``val_holdout``):
  training sequences start on neither, validation and test sequences only on their own cells
  (``eval_holdout: 0`` tests on all starts, training ones included, as the original did).
- :class:`ImageSequences` on a labelled image set (MNIST, proc_digits): frame t is T_k(x_0, t)
  computed from x_0 directly, with the step table (scale 1 + 0.1t, rotation 10t degrees
  counter-clockwise, hue rotation 20t degrees), warps by ``affine_grid``/``grid_sample``
  (bilinear, zeros outside, 28x28 kept) about the image centre, and an HSV hue shift. Grey digits
  are made red, channels (x, 0, 0), as the spec says, so that a hue rotation changes them. Its
  ``factors`` are (label, step of each transformation): ``[label, t_scale, t_rotation, t_hue]``
  where only the column of k is non-zero (= t). The start set is a fixed seeded 80/20 split of
  the training images (MNIST: 48k train, 12k eval = test); the validation images
  (``val_fraction`` of the set, 1.2k) are carved from the 48k, so training uses 46.8k.

A *key* ``k * num_starts + start`` names one sequence; a batch is an int64 array of keys, so the
sampler (main process) draws k and the starts together and workers only render: any
``num_workers`` gives the same batches.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from latentzoo.data.datasets.errors import DatasetNotFoundError
from latentzoo.data.datasets.factors import FactorDataset, _as_int64_array
from latentzoo.data.datasets.proc_digits import ProcDigits

__all__ = [
    "FactorSequences",
    "ImageSequences",
    "MNISTSequences",
    "ProcDigitsSequences",
    "SequenceBatches",
    "SequenceDataset",
    "affine_warp",
    "hue_rotate",
    "load_mnist",
]

#: start pools: ``train``; ``val`` (validation, carved from the training part); ``eval``
#: (the held-out test pool, also what metrics and callbacks draw from). The three are disjoint.
Split = Literal["train", "val", "eval"]


class SequenceDataset(abc.ABC):
    """A source of transformation sequences: K transformations, start items, batched rendering."""

    #: name of each transformation k
    transform_names: tuple[str, ...] = ()
    #: column of ``factors`` changed by each transformation k
    transform_factors: tuple[int, ...] = ()
    #: name of each column of ``factors``
    factor_names: tuple[str, ...] = ()
    image_shape: tuple[int, int, int] = (1, 28, 28)

    @property
    def num_transforms(self) -> int:
        """Number of transformations K."""
        return len(self.transform_names)

    @property
    @abc.abstractmethod
    def num_starts(self) -> int:
        """Size of the start-id space (keys are ``k * num_starts + start``)."""

    @property
    @abc.abstractmethod
    def num_train(self) -> int:
        """Number of training start items (the default epoch size)."""

    @abc.abstractmethod
    def max_steps(self, k: int) -> int:
        """Largest number of steps S a sequence of transformation k can take."""

    @abc.abstractmethod
    def sample_starts(
        self, split: Split, k: np.ndarray, steps: int, rng: np.random.Generator
    ) -> np.ndarray:
        """Random start ids (int64, shape of ``k``) of ``split`` valid for ``steps`` steps of k."""

    @abc.abstractmethod
    def render(self, k: np.ndarray, starts: np.ndarray, steps: int) -> dict[str, torch.Tensor]:
        """Batch dict (``frames``, ``k``, ``factors``) of the sequences ``(k[i], starts[i])``."""

    def check_steps(self, steps: int) -> None:
        """Refuse ``steps`` that some transformation cannot take (one-line error)."""
        if steps < 1:
            raise ValueError(f"a sequence needs at least one step, got seq_len={steps}")
        for k, name in enumerate(self.transform_names):
            if steps > self.max_steps(k):
                raise ValueError(
                    f"seq_len={steps} is too long for transformation {k} ({name}): "
                    f"at most {self.max_steps(k)} steps fit"
                )

    def keys_of(self, k: np.ndarray, starts: np.ndarray) -> np.ndarray:
        """Sequence keys ``k * num_starts + start`` (int64)."""
        return np.asarray(k, dtype=np.int64) * self.num_starts + np.asarray(starts, dtype=np.int64)

    def split_keys(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Inverse of :meth:`keys_of`: ``(k, starts)``."""
        keys = _as_int64_array(keys, "keys").reshape(-1)
        k, starts = np.divmod(keys, self.num_starts)
        if keys.size and (k.min() < 0 or k.max() >= self.num_transforms):
            raise IndexError(f"sequence key out of range for {self.num_transforms} transforms")
        return k, starts

    def eval_keys(
        self, steps: int, per_k: int | None, seed: int, split: Split = "eval"
    ) -> np.ndarray:
        """A fixed set of keys of ``split`` (``val`` or ``eval``), ``per_k`` per transformation,
        grouped by k.

        ``per_k`` None means 10,000 (spec §9's default for the 3D sets).
        """
        per_k = 10_000 if per_k is None else per_k
        rng = np.random.default_rng([int(seed), 0x5EC])
        keys = []
        for k in range(self.num_transforms):
            ks = np.full(int(per_k), k, dtype=np.int64)
            keys.append(self.keys_of(ks, self.sample_starts(split, ks, steps, rng)))
        return np.concatenate(keys) if keys else np.zeros(0, dtype=np.int64)


SPLIT_CODE = {"train": 0, "val": 1, "eval": 2}


def _resolve_factors(names: Sequence[str], wanted: Sequence[int | str]) -> tuple[int, ...]:
    out = []
    for w in wanted:
        if isinstance(w, str):
            if w not in names:
                raise ValueError(f"unknown factor {w!r}; the dataset has {list(names)}")
            out.append(list(names).index(w))
        else:
            if not 0 <= int(w) < len(names):
                raise ValueError(f"factor index {w} out of range for {len(names)} factors")
            out.append(int(w))
    if len(set(out)) != len(out):
        raise ValueError(f"transform_factors repeats a factor: {list(wanted)}")
    return tuple(out)


class FactorSequences(SequenceDataset):
    """Sequences on a ground-truth factor grid: transformation k steps one factor, others fixed.

    Args:
        dataset: the factor dataset (its full grid is used; a subset restriction is ignored).
        transform_factors: the factor stepped by each transformation k, by name or index
            (3D Shapes: floor_hue, wall_hue, object_hue, scale, orientation).
        start: ``"uniform"`` [LZ]: the stepped factor starts uniformly in ``[0, size-1-S]``;
            ``"zero"`` [ORIGINAL, Shapes3D]: it always starts at class 0.
        eval_holdout: fraction of grid cells reserved as test start configurations; 0 tests on
            every start, training ones included [ORIGINAL].
        val_holdout: fraction of grid cells reserved, disjoint from the test cells, as
            validation start configurations (training never starts there).
        split_seed: seed of those reservations.
    """

    def __init__(
        self,
        dataset: FactorDataset,
        transform_factors: Sequence[int | str],
        start: Literal["uniform", "zero"] = "uniform",
        eval_holdout: float = 0.1,
        val_holdout: float = 0.05,
        split_seed: int = 0,
    ) -> None:
        if start not in ("uniform", "zero"):
            raise ValueError(f"start must be 'uniform' or 'zero', got {start!r}")
        if min(eval_holdout, val_holdout) < 0 or eval_holdout + val_holdout >= 1:
            raise ValueError(
                f"eval_holdout ({eval_holdout}) and val_holdout ({val_holdout}) must be >= 0 "
                "and leave training cells (sum < 1)"
            )
        self.dataset = dataset
        self.transform_factors = _resolve_factors(dataset.factor_names, transform_factors)
        self.transform_names = tuple(dataset.factor_names[f] for f in self.transform_factors)
        self.factor_names = tuple(dataset.factor_names)
        self.image_shape = tuple(dataset.image_shape)
        self.start = start
        self.eval_holdout, self.val_holdout = float(eval_holdout), float(val_holdout)
        self._sizes = np.asarray(dataset.factor_sizes, dtype=np.int64)
        # split of each grid cell from one seeded uniform draw u: test where u < eval_holdout
        # (the same cells as without a validation split), validation in the next val_holdout
        u = np.random.default_rng([int(split_seed), 0xE7A1]).random(dataset.num_grid)
        self._cell_split = np.zeros(dataset.num_grid, dtype=np.int8)  # 0 train
        self._cell_split[u < eval_holdout + val_holdout] = SPLIT_CODE["val"]
        self._cell_split[u < eval_holdout] = SPLIT_CODE["eval"]
        self._pools: dict[tuple[str, int, int], int] = {}

    def _in_split(self, cells: np.ndarray, split: Split) -> np.ndarray:
        """Whether the grid cells may start a sequence of ``split`` (bool, shape of cells)."""
        if split == "eval" and self.eval_holdout == 0:  # [ORIGINAL]: test on every start
            return np.ones(np.shape(cells), dtype=bool)
        return self._cell_split[cells] == SPLIT_CODE[split]

    @property
    def num_starts(self) -> int:
        return self.dataset.num_grid

    @property
    def num_train(self) -> int:
        return int((self._cell_split == SPLIT_CODE["train"]).sum())

    def max_steps(self, k: int) -> int:
        return int(self._sizes[self.transform_factors[k]]) - 1

    def _pool_size(self, split: Split, k: int, steps: int) -> int:
        """Number of valid start cells of transformation k in ``split``."""
        f = self.transform_factors[k]
        top = 1 if self.start == "zero" else int(self._sizes[f]) - steps
        cells = np.arange(self.dataset.num_grid).reshape(tuple(self._sizes))
        inside = np.take(cells, np.arange(max(top, 0)), axis=f)
        return int(self._in_split(inside, split).sum())

    def sample_starts(
        self, split: Split, k: np.ndarray, steps: int, rng: np.random.Generator
    ) -> np.ndarray:
        k = np.asarray(k, dtype=np.int64).reshape(-1)
        out = np.empty(k.size, dtype=np.int64)
        for kk in np.unique(k):
            rows = np.flatnonzero(k == kk)
            out[rows] = self._draw(split, int(kk), steps, rows.size, rng)
        return out

    def _draw(
        self, split: Split, k: int, steps: int, n: int, rng: np.random.Generator
    ) -> np.ndarray:
        """``n`` start grid indices for k by rejection against the split's cells."""
        if (split, k, steps) not in self._pools:  # O(grid) count, once per (split, k, steps)
            self._pools[split, k, steps] = self._pool_size(split, k, steps)
        if self._pools[split, k, steps] == 0:
            raise ValueError(
                f"no {split} start configuration for transformation {k} "
                f"({self.transform_names[k]}) with {steps} steps; raise eval_holdout/val_holdout "
                "or lower seq_len"
            )
        f = self.transform_factors[k]
        top = 1 if self.start == "zero" else int(self._sizes[f]) - steps
        valid = int(np.prod(self._sizes)) // int(self._sizes[f]) * top
        oversample = 1.25 * valid / self._pools[split, k, steps]  # 1 / acceptance, with room
        out = np.empty(0, dtype=np.int64)
        while out.size < n:
            m = int(oversample * (n - out.size)) + 16
            factors = rng.integers(0, self._sizes, size=(m, self._sizes.size), dtype=np.int64)
            factors[:, f] = rng.integers(0, top, size=m)
            index = factors @ self.dataset.factor_bases
            out = np.concatenate([out, index[self._in_split(index, split)]])
        return out[:n]

    def frame_factors(self, k: np.ndarray, starts: np.ndarray, steps: int) -> np.ndarray:
        """Factor classes (B, S+1, F) of every frame: the start with factor k advanced by t."""
        k = np.asarray(k, dtype=np.int64).reshape(-1)
        factors = self.dataset.factors_of(np.asarray(starts, dtype=np.int64).reshape(-1))
        frames = np.repeat(factors[:, None, :], steps + 1, axis=1)
        cols = np.asarray(self.transform_factors, dtype=np.int64)[k]
        rows = np.arange(k.size)
        frames[rows, :, cols] += np.arange(steps + 1)[None, :]
        if (frames[rows, -1, cols] >= self._sizes[cols]).any():
            raise ValueError(f"a start leaves the grid within {steps} steps")
        return frames

    def render(self, k: np.ndarray, starts: np.ndarray, steps: int) -> dict[str, torch.Tensor]:
        k = np.asarray(k, dtype=np.int64).reshape(-1)
        factors = self.frame_factors(k, starts, steps)
        images = self.dataset.images_of(factors.reshape(-1, factors.shape[-1]))
        frames = images.reshape(k.size, steps + 1, *images.shape[1:])
        return {"frames": frames, "k": torch.from_numpy(k), "factors": torch.from_numpy(factors)}

    def __repr__(self) -> str:
        return (
            f"FactorSequences({type(self.dataset).__name__}, "
            f"transforms={list(self.transform_names)}, start={self.start}, "
            f"eval_holdout={self.eval_holdout}, val_holdout={self.val_holdout})"
        )


# ---------------------------------------------------------------------- image transforms
def affine_warp(x: torch.Tensor, scale: torch.Tensor, angle_deg: torch.Tensor) -> torch.Tensor:
    """Scale by ``scale`` and rotate counter-clockwise by ``angle_deg`` about the image centre.

    ``x`` (N, C, H, W); ``scale``, ``angle_deg`` (N,). Bilinear, zeros outside, same size. The
    output pixel at p samples the input at ``A^-1 p`` (coordinates centred, y down), where
    ``A = scale * R`` and ``R = [[cos, sin], [-sin, cos]]`` turns right into up on screen.
    """
    a = torch.deg2rad(angle_deg.to(torch.float64))
    inv = 1.0 / scale.to(torch.float64)
    cos, sin = torch.cos(a) * inv, torch.sin(a) * inv
    zero = torch.zeros_like(cos)
    # A^-1 = R^T / scale = [[cos, -sin], [sin, cos]] / scale; affine_grid's (x, y) are (W, H)
    theta = torch.stack([torch.stack([cos, -sin, zero], -1), torch.stack([sin, cos, zero], -1)], 1)
    if x.shape[-1] != x.shape[-2]:  # normalised coordinates: rescale the off-diagonal terms
        ratio = x.shape[-2] / x.shape[-1]  # H / W
        theta[:, 0, 1] *= ratio
        theta[:, 1, 0] /= ratio
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    """RGB (..., 3, H, W) in [0, 1] to HSV with hue in [0, 1) (fraction of a turn)."""
    r, g, b = x.unbind(-3)
    v, argmax = x.max(dim=-3)
    c = v - x.min(dim=-3).values
    safe = torch.where(c > 0, c, torch.ones_like(c))
    h = torch.where(argmax == 0, ((g - b) / safe) % 6.0, torch.zeros_like(c))
    h = torch.where(argmax == 1, (b - r) / safe + 2.0, h)
    h = torch.where(argmax == 2, (r - g) / safe + 4.0, h)
    h = torch.where(c > 0, h / 6.0, torch.zeros_like(h))
    s = torch.where(v > 0, c / torch.where(v > 0, v, torch.ones_like(v)), torch.zeros_like(v))
    return torch.stack([h, s, v], dim=-3)


def hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    """HSV (..., 3, H, W) (hue in turns) to RGB in [0, 1]."""
    h, s, v = x.unbind(-3)
    # the standard closed form: channel n takes v - v s max(0, min(k, 4 - k, 1)), k = (n + 6h) % 6
    out = []
    for n in (5.0, 3.0, 1.0):
        kk = (n + h * 6.0) % 6.0
        out.append(v - v * s * torch.clamp(torch.minimum(kk, 4.0 - kk), 0.0, 1.0))
    return torch.stack(out, dim=-3)


def hue_rotate(x: torch.Tensor, degrees: torch.Tensor) -> torch.Tensor:
    """Rotate the HSV hue of RGB images ``x`` (N, 3, H, W) by ``degrees`` (N,)."""
    hsv = rgb_to_hsv(x)
    shift = (degrees.to(x.dtype) / 360.0).reshape(-1, 1, 1)
    hsv = torch.stack([(hsv[:, 0] + shift) % 1.0, hsv[:, 1], hsv[:, 2]], dim=1)
    return hsv_to_rgb(hsv)


#: magnitude at step t: scale 1 + a t, rotation a t degrees, hue a t degrees (spec §7 table)
DEFAULT_STEPS: dict[str, float] = {"scale": 0.1, "rotation": 10.0, "hue": 20.0}


class ImageSequences(SequenceDataset):
    """Sequences T_k(x_0, t) of a labelled grey image set (MNIST, proc_digits), made red.

    Args:
        images: a callable ``images(positions) -> uint8 (N, 1, H, W)`` of the base set.
        labels: int64 (N_base,) labels of the base set.
        image_hw: (H, W) of the base images; frames are (3, H, W).
        transforms: the transformation of each k, from ``scale``, ``rotation``, ``hue``.
        steps: magnitude per step of each transformation (default: the spec's table).
        eval_fraction: fraction of the base set held out for testing (seeded, fixed).
        val_fraction: fraction of the base set held out for validation, taken from the
            training part (disjoint from the test images).
        split_seed: seed of those splits.
    """

    factor_names: tuple[str, ...]

    def __init__(
        self,
        images: Any,
        labels: np.ndarray,
        image_hw: tuple[int, int],
        transforms: Sequence[str] = ("scale", "rotation", "hue"),
        steps: Mapping[str, float] | None = None,
        eval_fraction: float = 0.2,
        val_fraction: float = 0.02,
        split_seed: int = 0,
    ) -> None:
        unknown = set(transforms) - set(DEFAULT_STEPS)
        if unknown or not transforms or len(set(transforms)) != len(transforms):
            raise ValueError(
                f"transforms must be distinct names from {sorted(DEFAULT_STEPS)}, got "
                f"{list(transforms)}"
            )
        if min(eval_fraction, val_fraction) <= 0 or eval_fraction + val_fraction >= 1:
            raise ValueError(
                f"eval_fraction ({eval_fraction}) and val_fraction ({val_fraction}) must be > 0 "
                "and leave training images (sum < 1)"
            )
        self._images = images
        self.labels = np.asarray(labels, dtype=np.int64)
        self.transform_names = tuple(transforms)
        self.steps = {**DEFAULT_STEPS, **dict(steps or {})}
        self.factor_names = ("label", *self.transform_names)
        self.transform_factors = tuple(range(1, len(self.transform_names) + 1))
        self.image_shape = (3, *image_hw)
        order = np.random.default_rng([int(split_seed), 0x5B1]).permutation(self.labels.size)
        n_eval = int(round(eval_fraction * self.labels.size))
        n_val = max(1, int(round(val_fraction * self.labels.size)))
        self.split_positions = {  # the test images do not depend on val_fraction
            "eval": np.sort(order[:n_eval]),
            "val": np.sort(order[n_eval : n_eval + n_val]),
            "train": np.sort(order[n_eval + n_val :]),
        }

    @property
    def num_starts(self) -> int:
        return int(self.labels.size)

    @property
    def num_train(self) -> int:
        return int(self.split_positions["train"].size)

    def max_steps(self, k: int) -> int:
        return 10**9  # frames are computed from x_0; content may leave the frame

    def sample_starts(
        self, split: Split, k: np.ndarray, steps: int, rng: np.random.Generator
    ) -> np.ndarray:
        pool = self.split_positions[split]
        return pool[rng.integers(0, pool.size, size=np.shape(k))]

    def eval_keys(
        self, steps: int, per_k: int | None, seed: int, split: Split = "eval"
    ) -> np.ndarray:
        """The whole ``split`` (``val`` or ``eval``) for every k (``per_k`` None), or its first
        ``per_k`` images."""
        pool = self.split_positions[split]
        if per_k is not None:
            pool = pool[: int(per_k)]
        ks = np.repeat(np.arange(self.num_transforms, dtype=np.int64), pool.size)
        return self.keys_of(ks, np.tile(pool, self.num_transforms))

    def magnitudes(self, k: np.ndarray, steps: int) -> dict[str, torch.Tensor]:
        """Per-frame scale, rotation (degrees) and hue (degrees), each (B, S+1) float64."""
        t = torch.arange(steps + 1, dtype=torch.float64)[None, :]
        k = torch.as_tensor(np.asarray(k, dtype=np.int64)).reshape(-1, 1)
        out = {"scale": torch.ones(k.shape[0], steps + 1, dtype=torch.float64)}
        out["rotation"] = torch.zeros_like(out["scale"])
        out["hue"] = torch.zeros_like(out["scale"])
        for j, name in enumerate(self.transform_names):
            on = k == j
            if name == "scale":
                out["scale"] = torch.where(on, 1.0 + self.steps[name] * t, out["scale"])
            else:
                out[name] = torch.where(on, self.steps[name] * t, out[name])
        return out

    def apply(self, x0: torch.Tensor, k: np.ndarray, steps: int) -> torch.Tensor:
        """Frames (B, S+1, 3, H, W) of RGB images ``x0`` (B, 3, H, W) under transformations k."""
        b = x0.shape[0]
        mag = {name: v.reshape(-1) for name, v in self.magnitudes(k, steps).items()}
        frames = x0[:, None].expand(b, steps + 1, *x0.shape[1:]).reshape(-1, *x0.shape[1:])
        frames = frames.clone()
        warp = (mag["scale"] != 1.0) | (mag["rotation"] != 0.0)
        if warp.any():  # frame 0 and hue-only frames are left untouched (bit-exact x_0)
            frames[warp] = affine_warp(frames[warp], mag["scale"][warp], mag["rotation"][warp])
        hue = mag["hue"] != 0.0
        if hue.any():
            frames[hue] = hue_rotate(frames[hue], mag["hue"][hue])
        return frames.reshape(b, steps + 1, *x0.shape[1:])

    def render(self, k: np.ndarray, starts: np.ndarray, steps: int) -> dict[str, torch.Tensor]:
        k = np.asarray(k, dtype=np.int64).reshape(-1)
        starts = np.asarray(starts, dtype=np.int64).reshape(-1)
        grey = self._images(starts).to(torch.float32).div_(255.0)  # (B, 1, H, W)
        red = torch.cat([grey, torch.zeros_like(grey), torch.zeros_like(grey)], dim=1)
        factors = np.zeros((k.size, steps + 1, len(self.factor_names)), dtype=np.int64)
        factors[:, :, 0] = self.labels[starts][:, None]
        factors[np.arange(k.size), :, np.asarray(self.transform_factors)[k]] = np.arange(steps + 1)
        return {
            "frames": self.apply(red, k, steps),
            "k": torch.from_numpy(k),
            "factors": torch.from_numpy(factors),
        }


def load_mnist(root: str | Path, download: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The MNIST training set via torchvision: ``(images uint8 (60000, 28, 28), labels int64)``.

    Raises :class:`DatasetNotFoundError` (where it looked, how to get it) when the files are
    missing and ``download`` is off, or when the download fails (offline).
    """
    from torchvision.datasets import MNIST

    root = Path(root).expanduser()
    raw = root / "MNIST" / "raw"
    try:
        ds = MNIST(str(root), train=True, download=download)
    except (RuntimeError, OSError) as error:
        raise DatasetNotFoundError(
            "MNIST",
            raw,
            expected=(
                "train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
                "t10k-labels-idx1-ubyte (torchvision MNIST layout)"
            ),
            source="torchvision.datasets.MNIST (mirrors of http://yann.lecun.com/exdb/mnist/)",
            download_override=None if download else "data.source.download=true",
            reason=f"download failed: {' '.join(str(error).split())[:300]}" if download else None,
        ) from error
    return ds.data, ds.targets.to(torch.int64)


class MNISTSequences(ImageSequences):
    """MNIST sequences (K = 3 by default): torchvision train set, fixed 48k/12k split, red."""

    def __init__(
        self,
        root: str | Path,
        download: bool = False,
        transforms: Sequence[str] = ("scale", "rotation", "hue"),
        steps: Mapping[str, float] | None = None,
        eval_fraction: float = 0.2,
        val_fraction: float = 0.02,
        split_seed: int = 0,
    ) -> None:
        images, labels = load_mnist(root, download)
        self._data = images[:, None].contiguous()  # uint8 (N, 1, 28, 28), shared by workers

        super().__init__(
            self._gather,
            labels.numpy(),
            tuple(images.shape[-2:]),
            transforms,
            steps,
            eval_fraction,
            val_fraction,
            split_seed,
        )

    def _gather(self, positions: np.ndarray) -> torch.Tensor:
        return self._data[torch.from_numpy(positions)]


class ProcDigitsSequences(ImageSequences):
    """proc_digits sequences: the MNIST transformations on the procedural digits' train split.

    ``cache`` keeps rendered digits (47 MB at most), so only the first epoch pays for rendering.
    """

    def __init__(
        self,
        seed: int = 0,
        transforms: Sequence[str] = ("scale", "rotation", "hue"),
        steps: Mapping[str, float] | None = None,
        eval_fraction: float = 0.2,
        val_fraction: float = 0.02,
        split_seed: int = 0,
        cache: bool = True,
    ) -> None:
        self.digits = ProcDigits("train", seed=seed, cache=cache)
        super().__init__(
            self.digits.images_u8_of,
            self.digits.labels,
            (28, 28),
            transforms,
            steps,
            eval_fraction,
            val_fraction,
            split_seed,
        )


class SequenceBatches(Dataset[dict[str, torch.Tensor]]):
    """Map-style dataset whose index is a whole batch of sequence keys (int64 array).

    Used with ``DataLoader(batch_size=None, sampler=<a sampler yielding key arrays>)``: each
    worker renders one batch per call, so nothing about k lives in the workers.
    """

    # sequences are rendered from their keys alone (the sampler draws the keys), so a loader may
    # render batches ahead in a thread (data.resumable, prefetch)
    draws_random = False

    def __init__(self, source: SequenceDataset, steps: int) -> None:
        self.source = source
        self.steps = int(steps)

    def __len__(self) -> int:
        return self.source.num_transforms * self.source.num_starts

    def __getitem__(self, keys: Any) -> dict[str, torch.Tensor]:
        k, starts = self.source.split_keys(np.asarray(keys))
        return self.source.render(k, starts, self.steps)
