"""Tests of the procedural 3D Shapes renderer: grid, images, determinism, identifiability, hues.

Scene convention checked here: images are (3, 64, 64); the wall fills the top rows, the floor the
bottom rows, the object stands at the centre (row ~44, column 32).
"""

from __future__ import annotations

import colorsys
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from latentzoo.data import GroundTruthDataModule
from latentzoo.data.datasets import ProcShapes3D

FLOOR_HUE, WALL_HUE, OBJECT_HUE, SCALE, SHAPE, ORIENT = range(6)
SHAPES3D_BASES = (48000, 4800, 480, 60, 15, 1)
CENTRE = (44, 32)  # (row, column) inside the object for every scale, shape and orientation


@pytest.fixture(scope="module", autouse=True)
def _single_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def full() -> ProcShapes3D:
    return ProcShapes3D("full")


@pytest.fixture(scope="module")
def small() -> ProcShapes3D:
    return ProcShapes3D("small")


def hue_of(rgb: torch.Tensor) -> float:
    return colorsys.rgb_to_hsv(*(float(c) for c in rgb))[0]


def hue_distance(a: float, b: float) -> float:
    d = abs(a - b) % 1.0
    return min(d, 1.0 - d)


def test_grid_matches_3d_shapes(full: ProcShapes3D, small: ProcShapes3D) -> None:
    assert full.factor_names == (
        "floor_hue",
        "wall_hue",
        "object_hue",
        "scale",
        "shape",
        "orientation",
    )
    assert full.factor_sizes == (10, 10, 10, 8, 4, 15) and len(full) == 480_000
    assert tuple(full.factor_bases) == SHAPES3D_BASES
    values = full.factor_values
    for k in (FLOOR_HUE, WALL_HUE, OBJECT_HUE):
        np.testing.assert_allclose(values[k], np.linspace(0.0, 0.9, 10))
    np.testing.assert_allclose(values[SCALE], np.linspace(0.75, 1.25, 8))
    np.testing.assert_array_equal(values[SHAPE], np.arange(4.0))
    np.testing.assert_allclose(values[ORIENT], np.linspace(-30.0, 30.0, 15))
    assert small.factor_sizes == (4, 4, 4, 3, 4, 5) and len(small) == 3840
    for k in range(6):  # same value ranges on the small grid
        assert small.factor_values[k][0] == values[k][0]
        assert small.factor_values[k][-1] == values[k][-1]
    with pytest.raises(ValueError, match="size"):
        ProcShapes3D("medium")  # type: ignore[arg-type]


def test_images_shapes_dtypes_range(full: ProcShapes3D) -> None:
    factors = full.sample_factors(64, 0)
    images = full.images_of(factors)
    assert images.dtype == torch.float32 and images.shape == (64, 3, 64, 64)
    assert float(images.min()) >= 0.0 and float(images.max()) <= 1.0
    assert float(images.std()) > 0.1  # not blank
    u8 = full.images_u8_of(factors)
    assert u8.dtype == torch.uint8 and torch.equal(u8, (images * 255).round().to(torch.uint8))
    image, f = full[123_456]
    assert image.shape == (3, 64, 64) and torch.equal(f, torch.from_numpy(full.factors_of(123_456)))
    assert torch.equal(image, full.images_of(f.numpy()[None])[0])


def test_determinism(full: ProcShapes3D) -> None:
    factors = full.sample_factors(300, 1)
    batch = full.images_of(factors)
    again = ProcShapes3D("full").images_of(factors)  # a fresh instance
    singles = torch.cat([full.images_of(factors[i : i + 1]) for i in range(0, 300, 37)])
    reversed_ = full.images_of(factors[::-1].copy()).flip(0)
    torch.set_num_threads(2)
    try:
        threaded = full.images_of(factors)
    finally:
        torch.set_num_threads(1)
    assert torch.equal(batch, again) and torch.equal(batch, reversed_)
    assert torch.equal(batch, threaded) and torch.equal(batch[::37], singles)


def test_every_factor_changes_the_image(full: ProcShapes3D) -> None:
    rng = np.random.default_rng(2)
    bases = full.sample_factors(12, rng)
    for k, size in enumerate(full.factor_sizes):
        variants = np.repeat(bases[:, None, :], size, axis=1)  # (12, size, 6)
        variants[:, :, k] = np.arange(size)
        images = full.images_of(variants.reshape(-1, 6)).view(12, size, -1)
        for b in range(12):
            diff = (images[b, :, None] - images[b, None, :]).abs().amax(-1)  # (size, size)
            off_diagonal = diff[~torch.eye(size, dtype=torch.bool)]
            assert float(off_diagonal.min()) > 0.02, (full.factor_names[k], bases[b])


def test_all_small_grid_images_are_distinct(small: ProcShapes3D) -> None:
    images = small.images_u8_of(small.factors_of(np.arange(len(small)))).numpy()
    assert len({image.tobytes() for image in images}) == len(small)


def test_hues_colour_the_right_regions(small: ProcShapes3D) -> None:
    """Floor hue -> bottom rows only, wall hue -> top rows only, object hue -> the centre; and the
    colour there has that hue (shading changes only brightness)."""
    # every (scale, shape, orientation) combination, each with 4 random hue triplets
    rng = np.random.default_rng(3)
    combos = small.factors_of(np.arange(small.factor_bases[2]))[:, 3:]  # hues 0, all combos
    assert len(np.unique(combos, axis=0)) == 3 * 4 * 5
    hues = small.sample_factors(4 * len(combos), rng)[:, :3]
    factors = np.concatenate([hues, np.repeat(combos, 4, axis=0)], axis=1)
    images = small.images_of(factors)
    values = small.values_of(factors)
    for k, region in ((FLOOR_HUE, "floor"), (WALL_HUE, "wall"), (OBJECT_HUE, "object")):
        shifted = factors.copy()
        shifted[:, k] = (shifted[:, k] + 1) % small.factor_sizes[k]
        changed = (small.images_of(shifted) - images).abs().amax(1) > 1e-4  # (N, H, W)
        if region == "floor":
            assert changed[:, -1].all() and not changed[:, :30].any()
        elif region == "wall":
            assert changed[:, 0].all() and not changed[:, -4:].any()
        else:
            assert changed[:, CENTRE[0], CENTRE[1]].all()
            assert not changed[:, 0].any() and not changed[:, -1].any()
    for i in range(0, len(factors), 3):
        fh, wh, oh = values[i, :3]
        assert hue_distance(hue_of(images[i, :, -1, 5]), fh) < 0.01
        assert hue_distance(hue_of(images[i, :, 0, 5]), wh) < 0.01
        assert hue_distance(hue_of(images[i, :, CENTRE[0], CENTRE[1]]), oh) < 0.01


def test_scale_grows_the_object(full: ProcShapes3D) -> None:
    """Object area (pixels that follow the object hue) increases with scale, for every shape."""
    for shape in range(4):
        for orient in (0, 7, 14):
            f = np.array([[0, 3, 0, s, shape, orient] for s in range(8)])
            g = f.copy()
            g[:, OBJECT_HUE] = 5
            area = ((full.images_of(f) - full.images_of(g)).abs().amax(1) > 0.05).sum((1, 2))
            assert bool((area[1:] > area[:-1]).all()), (shape, orient, area.tolist())


def test_datamodule_batches(small: ProcShapes3D) -> None:
    dm = GroundTruthDataModule(small, [3, 64, 64], batch_size=32, val_size=64, test_size=64)
    images, factors = next(iter(dm.train_dataloader()))
    assert images.shape == (32, 3, 64, 64) and factors.shape == (32, 6)
    assert torch.equal(images, small.images_of(factors.numpy()))
