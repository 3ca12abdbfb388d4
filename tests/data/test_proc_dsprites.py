"""Tests of FactorDataset index arithmetic and the procedural dSprites renderer.

Image convention checked here: images are (C, H, W) = (1, 64, 64); ``posX`` moves the shape along
the width axis (columns, x), ``posY`` along the height axis (rows, y, downwards).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from latentzoo.data.datasets import FactorDataset, ProcDSprites
from latentzoo.data.datasets.proc_dsprites import MARGIN

COLOR, SHAPE, SCALE, ORIENT, POSX, POSY = range(6)
SQUARE, ELLIPSE, HEART = range(3)
DSPRITES_BASES = (737280, 245760, 40960, 1024, 32, 1)


@pytest.fixture(scope="module", autouse=True)
def _single_thread() -> Iterator[None]:
    """Render with one torch thread: on a busy 2-core CI box, intra-op threads only add
    contention (results are identical for any thread count, see test_determinism)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def full() -> ProcDSprites:
    return ProcDSprites("full")


@pytest.fixture(scope="module")
def small() -> ProcDSprites:
    return ProcDSprites("small")


def render(ds: ProcDSprites, factors: list[list[int]] | np.ndarray) -> torch.Tensor:
    """Images (N, 64, 64) uint8 of the factor rows."""
    return ds.images_u8_of(np.asarray(factors, dtype=np.int64))[:, 0]


def is_binary(x: torch.Tensor) -> bool:
    """All values are exactly 0 or 1 (cheaper than a unique() on big batches)."""
    return bool(((x == 0) | (x == 1)).all())


def centre_of_mass(images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) centre of mass in continuous pixel coordinates (pixel j covers [j, j+1))."""
    img = images.double()
    mass = img.sum(dim=(-2, -1))
    coords = torch.arange(img.shape[-1], dtype=torch.float64) + 0.5
    x = (img.sum(dim=-2) * coords).sum(-1) / mass
    y = (img.sum(dim=-1) * coords).sum(-1) / mass
    return x.numpy(), y.numpy()


def documented_symmetry(ds: ProcDSprites, shape: int, scale: int, o1: int, o2: int) -> bool:
    """Orientation pairs allowed to render identically (see the proc_dsprites docstring).

    Exact: first and last class (angles 0 and 2*pi). Approximate: angles within 5 degrees of the
    shape's rotational symmetry (90 degrees for the square, 180 for the ellipse).
    """
    n = ds.factor_sizes[ORIENT]
    if {o1, o2} == {0, n - 1} or o1 == o2:
        return True
    period = {SQUARE: 90.0, ELLIPSE: 180.0}.get(shape)
    if period is None:
        return False
    angles = ds.factor_values[ORIENT]
    d = np.degrees(abs(angles[o1] - angles[o2])) % period
    return min(d, period - d) < 5.0


# --------------------------------------------------------------------------- grid arithmetic
def test_grid_matches_dsprites(full: ProcDSprites) -> None:
    assert isinstance(full, FactorDataset)
    assert full.factor_names == ("color", "shape", "scale", "orientation", "posX", "posY")
    assert full.factor_sizes == (1, 3, 6, 40, 32, 32)
    assert full.factor_bases.dtype == np.int64
    assert tuple(full.factor_bases) == DSPRITES_BASES
    assert len(full) == 737280 and full.num_factors == 6
    assert full.image_shape == (1, 64, 64)
    values = full.factor_values
    np.testing.assert_allclose(values[SCALE], np.linspace(0.5, 1.0, 6))
    np.testing.assert_allclose(values[ORIENT], np.linspace(0.0, 2 * np.pi, 40))
    np.testing.assert_allclose(values[POSX], np.linspace(0.0, 1.0, 32))
    np.testing.assert_allclose(values[POSY], np.linspace(0.0, 1.0, 32))


def test_index_factor_round_trip(full: ProcDSprites) -> None:
    rng = np.random.default_rng(0)
    idx = rng.integers(0, len(full), size=5000)
    idx = np.concatenate([idx, [0, len(full) - 1]])
    f = full.factors_of(idx)
    assert f.shape == (idx.size, 6) and f.dtype == np.int64
    # Same as numpy's C-order unravel (last factor fastest) and as the dot with dSprites' bases.
    np.testing.assert_array_equal(f, np.stack(np.unravel_index(idx, full.factor_sizes), -1))
    np.testing.assert_array_equal(f @ np.asarray(DSPRITES_BASES), idx)
    np.testing.assert_array_equal(full.index_of(f), idx)
    # torch input, scalars and batch shapes
    np.testing.assert_array_equal(full.factors_of(torch.from_numpy(idx)), f)
    np.testing.assert_array_equal(full.index_of(torch.from_numpy(f)), idx)
    assert full.factors_of(np.int64(idx[0])).shape == (6,)
    assert int(full.index_of(f[0])) == idx[0]
    assert full.factors_of(idx.reshape(-1, 2)).shape == (idx.size // 2, 2, 6)
    # factors -> index -> factors over random factor vectors
    g = full.sample_factors(1000, rng)
    np.testing.assert_array_equal(full.factors_of(full.index_of(g)), g)


def test_index_errors(full: ProcDSprites) -> None:
    with pytest.raises(IndexError):
        full.factors_of(len(full))
    with pytest.raises(IndexError):
        full.factors_of(-1)
    with pytest.raises(ValueError):
        full.index_of([0, 3, 0, 0, 0, 0])  # shape class 3 does not exist
    with pytest.raises(ValueError):
        full.index_of([0, 0, 0])  # wrong number of factors
    with pytest.raises(TypeError):
        full.factors_of(np.array([1.5]))


def test_sample_factors(full: ProcDSprites) -> None:
    f = full.sample_factors(20000, np.random.default_rng(1))
    assert f.shape == (20000, 6) and f.dtype == np.int64
    assert (f >= 0).all() and (f < np.asarray(full.factor_sizes)).all()
    for k, size in enumerate(full.factor_sizes):  # every class of every factor is drawn
        counts = np.bincount(f[:, k], minlength=size)
        assert counts.min() > 0.5 * 20000 / size
    np.testing.assert_array_equal(full.sample_factors(10, 3), full.sample_factors(10, 3))


def test_values_of(full: ProcDSprites) -> None:
    v = full.values_of([[0, 2, 5, 39, 31, 0], [0, 0, 0, 0, 0, 31]])
    np.testing.assert_allclose(v[0], [1.0, 3.0, 1.0, 2 * np.pi, 1.0, 0.0])
    np.testing.assert_allclose(v[1], [1.0, 1.0, 0.5, 0.0, 0.0, 1.0])


# --------------------------------------------------------------------------- images
def test_images_binary_float32(full: ProcDSprites) -> None:
    f = full.sample_factors(300, np.random.default_rng(2))
    x = full.images_of(f)
    assert x.shape == (300, 1, 64, 64) and x.dtype == torch.float32
    assert is_binary(x) and bool((x == 0).any()) and bool((x == 1).any())
    assert (x.sum(dim=(1, 2, 3)) > 0).all()  # no empty canvas
    img, fac = full[12345]
    assert img.shape == (1, 64, 64) and img.dtype == torch.float32
    assert fac.dtype == torch.int64 and fac.shape == (6,)
    assert is_binary(img)


def test_area_grows_with_scale(full: ProcDSprites) -> None:
    for shape in range(3):
        for orient in (0, 5, 13, 27):
            f = [[0, shape, s, orient, 16, 16] for s in range(6)]
            area = render(full, f).sum(dim=(1, 2)).tolist()
            assert all(a < b for a, b in zip(area, area[1:], strict=False)), (shape, orient, area)
    # Sizes roughly like dSprites: the scale-1 square is 19 px wide (361 px^2).
    square = render(full, [[0, SQUARE, 5, 0, 16, 16]])[0]
    assert 330 <= int(square.sum()) <= 400
    assert int(square.any(dim=0).sum()) in (19, 20)


def test_position_moves_centre_of_mass(full: ProcDSprites) -> None:
    centres = MARGIN + np.linspace(0, 1, 32) * (64 - 2 * MARGIN)
    for shape in range(3):
        for orient in (0, 11):
            fx = [[0, shape, 3, orient, p, 16] for p in range(32)]
            fy = [[0, shape, 3, orient, 16, p] for p in range(32)]
            x_of_x, y_of_x = centre_of_mass(render(full, fx))
            x_of_y, y_of_y = centre_of_mass(render(full, fy))
            # posX moves along columns (x) only, posY along rows (y) only, both increasing.
            assert (np.diff(x_of_x) > 0).all() and np.ptp(y_of_x) < 0.5
            assert (np.diff(y_of_y) > 0).all() and np.ptp(x_of_y) < 0.5
            # one step of a position class is 44/31 ~ 1.42 px
            assert 40 < x_of_x[-1] - x_of_x[0] < 48 and 40 < y_of_y[-1] - y_of_y[0] < 48
            if shape != HEART:  # centrally symmetric shapes: centre of mass = mapped centre
                np.testing.assert_allclose(x_of_x, centres, atol=0.5)
                np.testing.assert_allclose(y_of_y, centres, atol=0.5)


def test_orientation_direction(full: ProcDSprites) -> None:
    """Orientation rotates counter-clockwise on screen: the ellipse's long axis at ~37 degrees
    goes up-right (smaller row for larger column)."""
    img = render(full, [[0, ELLIPSE, 5, 4, 16, 16]])[0].double()
    ys, xs = torch.nonzero(img, as_tuple=True)
    cov = torch.cov(torch.stack([xs.double(), ys.double()]))
    assert cov[0, 1] < 0  # x up <-> y down in image rows
    flat = render(full, [[0, ELLIPSE, 5, 0, 16, 16]])[0]
    assert int(flat.any(dim=0).sum()) > int(flat.any(dim=1).sum())  # long axis horizontal


def test_shapes_differ(full: ProcDSprites) -> None:
    f = full.sample_factors(200, np.random.default_rng(3))
    imgs = [render(full, np.where(np.arange(6) == SHAPE, s, f)) for s in range(3)]
    for a in range(3):
        for b in range(a + 1, 3):
            assert (imgs[a] != imgs[b]).flatten(1).any(1).all(), (a, b)


def test_orientation_identifiable_except_symmetries(
    full: ProcDSprites, small: ProcDSprites
) -> None:
    for ds in (full, small):
        n_orient = ds.factor_sizes[ORIENT]
        for shape in range(3):
            for scale in range(ds.factor_sizes[SCALE]):
                f = [[0, shape, scale, o, 3, ds.factor_sizes[POSY] // 2] for o in range(n_orient)]
                flat = render(ds, f).flatten(1)
                same = (flat[:, None, :] == flat[None, :, :]).all(-1).numpy()
                for o1 in range(n_orient):
                    for o2 in range(o1 + 1, n_orient):
                        if not documented_symmetry(ds, shape, scale, o1, o2):
                            assert not same[o1, o2], (ds.size, shape, scale, o1, o2)
                # the exact symmetry: angle 0 == angle 2*pi
                assert same[0, n_orient - 1]


def test_each_factor_changes_image(full: ProcDSprites) -> None:
    rng = np.random.default_rng(4)
    base = full.sample_factors(300, rng)
    ref = render(full, base)
    for k, size in enumerate(full.factor_sizes):
        if size == 1:  # colour has a single class
            continue
        other = base.copy()
        other[:, k] = (base[:, k] + rng.integers(1, size, size=len(base))) % size
        changed = (render(full, other) != ref).flatten(1).any(1).numpy()
        if k == ORIENT:
            allowed = np.array(
                [
                    documented_symmetry(full, b[SHAPE], b[SCALE], b[ORIENT], o[ORIENT])
                    for b, o in zip(base, other, strict=True)
                ]
            )
            assert (changed | allowed).all()
            assert changed[~allowed].all()
        else:
            assert changed.all(), full.factor_names[k]


def test_determinism(full: ProcDSprites) -> None:
    f = full.sample_factors(300, np.random.default_rng(5))  # > CHUNK, all shapes mixed
    a = full.images_u8_of(f)
    b = ProcDSprites("full").images_u8_of(f)
    perm = np.random.default_rng(6).permutation(len(f))
    c = full.images_u8_of(f[perm])[np.argsort(perm)]
    d = torch.cat([full.images_u8_of(f[i : i + 7]) for i in range(0, len(f), 7)])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        e = full.images_u8_of(f)
    finally:
        torch.set_num_threads(threads)
    assert threads == 1  # the module fixture; so `a` was rendered single-threaded
    for other in (b, c, d, e):
        assert torch.equal(a, other)
    assert torch.equal(full.images_of(f), a.float())


def test_small_grid(small: ProcDSprites) -> None:
    assert small.factor_sizes == (1, 3, 3, 8, 8, 8)
    assert len(small) == 4608
    assert tuple(small.factor_bases) == (4608, 1536, 512, 64, 8, 1)
    np.testing.assert_allclose(small.factor_values[SCALE], np.linspace(0.5, 1.0, 3))
    np.testing.assert_allclose(small.factor_values[ORIENT], np.linspace(0, 2 * np.pi, 8))
    np.testing.assert_allclose(small.factor_values[POSX], np.linspace(0, 1, 8))
    images, factors = small.get_batch(np.arange(len(small)))
    assert images.shape == (4608, 1, 64, 64)
    assert is_binary(images)
    assert (images.sum(dim=(1, 2, 3)) >= 20).all()
    np.testing.assert_array_equal(factors.numpy(), small.factors_of(np.arange(len(small))))
    # Regression pin for cross-process/cross-machine byte determinism of the renderer. If the
    # renderer is changed on purpose, update the digest (and note it in the changelog).
    digest = hashlib.sha256(images.to(torch.uint8).numpy().tobytes()).hexdigest()
    assert digest == SMALL_GRID_SHA256


SMALL_GRID_SHA256 = "0b4fea396c51fbc47c7a89e9f35b015a34f1acbc99212a8b8d78c4d28e2cfc15"


def test_getitem_get_batch_agree(small: ProcDSprites) -> None:
    pos = np.array([0, 17, 4607, 123, 17])
    images, factors = small.get_batch(pos)
    assert images.shape == (5, 1, 64, 64) and factors.shape == (5, 6)
    for j, i in enumerate(pos):
        img, fac = small[int(i)]
        assert torch.equal(img, images[j]) and torch.equal(fac, factors[j])
    img, fac = small[-1]
    assert torch.equal(img, images[2]) and torch.equal(fac, factors[2])
    batch_imgs, batch_facs = small[torch.from_numpy(pos)]
    assert torch.equal(batch_imgs, images) and torch.equal(batch_facs, factors)
    items = small.__getitems__(pos.tolist())
    assert len(items) == 5 and torch.equal(items[1][0], images[1])
    np.testing.assert_array_equal(factors.numpy(), small.factors_of(pos))
    with pytest.raises(IndexError):
        small[len(small)]


def test_subset_and_dataloader() -> None:
    grid_idx = np.array([5, 100, 4000, 7, 2222, 3])
    sub = ProcDSprites("small", indices=grid_idx)
    ref = ProcDSprites("small")
    assert len(sub) == 6
    np.testing.assert_array_equal(sub.grid_index(np.arange(6)), grid_idx)
    images, factors = sub.get_batch(np.arange(6))
    ref_images, ref_factors = ref.get_batch(grid_idx)
    assert torch.equal(images, ref_images) and torch.equal(factors, ref_factors)
    loader = DataLoader(sub, batch_size=4, shuffle=False)  # uses __getitems__ + default collate
    batches = list(loader)
    assert [b[0].shape[0] for b in batches] == [4, 2]
    assert torch.equal(torch.cat([b[0] for b in batches]), images)
    assert torch.equal(torch.cat([b[1] for b in batches]), factors)
    with pytest.raises(IndexError):
        ProcDSprites("small", indices=[4608])
    with pytest.raises(ValueError):
        ProcDSprites("medium")  # type: ignore[arg-type]


def test_sample_sharing_keeps_chosen_factors_equal_within_groups() -> None:
    ds = ProcDSprites(size="small")
    groups = ds.sample_sharing(50, 4, shared=[1, 4], rng=0)
    assert groups.shape == (50, 4, 6)
    assert (groups[:, :, [1, 4]] == groups[:, :1, [1, 4]]).all()
    # the free factors still vary inside groups
    assert (groups[:, :, 3] != groups[:, :1, 3]).any()
    mask = np.zeros((50, 6), dtype=bool)
    mask[np.arange(50), np.arange(50) % 6] = True  # a different shared factor per group
    per_group = ds.sample_sharing(50, 2, shared=mask, rng=1)
    for g in range(50):
        k = g % 6
        assert per_group[g, 0, k] == per_group[g, 1, k]
    images = ds.images_of(per_group.reshape(-1, 6))
    assert images.shape == (100, 1, 64, 64)
    with pytest.raises(ValueError, match="shape"):
        ds.sample_sharing(3, 2, shared=np.zeros((4, 6), dtype=bool))
