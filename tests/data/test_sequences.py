"""Transformation sequences for latent_flow: factor sequences, image (MNIST) sequences, samplers.

Real-format loaders are exercised on small files in the official formats (3D Shapes h5,
Falcor3D/Isaac3D prepared arrays, a torchvision MNIST raw folder), written here.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import open_dict

from latentzoo.data import SequenceDataModule
from latentzoo.data.datasets import (
    DatasetNotFoundError,
    FactorSequences,
    Falcor3D,
    ImageSequences,
    Isaac3D,
    MNISTSequences,
    ProcDigitsSequences,
    ProcDSprites,
    Shapes3D,
)
from latentzoo.data.datasets.sequence_datasets import (
    affine_warp,
    hsv_to_rgb,
    hue_rotate,
    rgb_to_hsv,
)
from latentzoo.utils.distributed import instantiate_datamodule
from tests.conftest import compose_config
from tests.data.test_real_datasets import write_shapes3d

PD_TRANSFORMS = ["scale", "orientation", "posX", "posY"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Render with one intra-op thread: on a shared 2-core machine two threads spin-wait and
    the tiny batches here get several times slower. Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def dsprites_source() -> FactorSequences:
    return FactorSequences(ProcDSprites("small"), PD_TRANSFORMS, eval_holdout=0.2, split_seed=1)


def check_factor_batch(batch: dict, source: FactorSequences, steps: int) -> None:
    """Frames differ only in factor k, by +t; images are the dataset's images of those factors."""
    frames, k, factors = batch["frames"], batch["k"], batch["factors"]
    b = k.shape[0]
    assert frames.shape == (b, steps + 1, *source.image_shape) and frames.dtype == torch.float32
    assert k.dtype == torch.int64 and factors.dtype == torch.int64
    assert factors.shape == (b, steps + 1, source.dataset.num_factors)
    assert frames.min() >= 0.0 and frames.max() <= 1.0
    col = torch.tensor(source.transform_factors)[k]  # (B,) stepped factor of each sequence
    diff = factors - factors[:, :1]
    t = torch.arange(steps + 1)
    stepped = diff[torch.arange(b), :, col]  # (B, S+1)
    assert torch.equal(stepped, t.expand(b, -1))
    diff[torch.arange(b), :, col] = 0
    assert not diff.any()  # every other factor is fixed along the sequence
    sizes = torch.tensor(source.dataset.factor_sizes)
    assert (factors >= 0).all() and (factors < sizes).all()
    expected = source.dataset.images_of(factors.reshape(-1, factors.shape[-1]).numpy())
    assert torch.equal(frames.reshape(expected.shape), expected)


# ---------------------------------------------------------------------- factor sequences
def test_factor_sequences_vary_only_factor_k(dsprites_source: FactorSequences) -> None:
    src = dsprites_source
    assert src.transform_names == tuple(PD_TRANSFORMS) and src.transform_factors == (2, 3, 4, 5)
    rng = np.random.default_rng(0)
    k = rng.integers(0, 4, size=64)
    batch = src.render(k, src.sample_starts("train", k, 2, rng), steps=2)
    check_factor_batch(batch, src, 2)
    assert set(batch["k"].tolist()) == {0, 1, 2, 3}
    # the frames really change along every transformation (scale, rotation, translations)
    moved = (batch["frames"][:, 1:] != batch["frames"][:, :-1]).flatten(2).any(-1)
    for kk in range(4):
        assert moved[batch["k"] == kk].float().mean() > 0.8
    # the start of the stepped factor covers [0, size - 1 - S] (scale: 3 classes -> only 0)
    start = batch["factors"][:, 0]
    assert set(start[batch["k"] == 0, 2].tolist()) == {0}
    assert set(start[batch["k"] == 2, 4].tolist()) == set(range(6))
    # the other factors are random: shape (never traversed) takes all its values
    assert set(start[:, 1].tolist()) == {0, 1, 2}


def test_holdout_of_start_configurations(dsprites_source: FactorSequences) -> None:
    src = dsprites_source
    rng = np.random.default_rng(1)
    k = np.repeat(np.arange(4), 200)
    train = src.sample_starts("train", k, 2, rng)
    held = src.sample_starts("eval", k, 2, rng)
    val = src.sample_starts("val", k, 2, rng)
    mask = src._cell_split == 2  # test cells
    val_mask = src._cell_split == 1
    assert not mask[train].any() and mask[held].all() and not val_mask[train].any()
    assert val_mask[val].all() and not mask[val].any()
    assert 0.15 < mask.mean() < 0.25  # eval_holdout = 0.2 of the grid cells
    assert 0.03 < val_mask.mean() < 0.07  # val_holdout = 0.05 (default)
    assert src.num_train == src.dataset.num_grid - int(mask.sum()) - int(val_mask.sum())
    # pool sizes: valid starts of posX (8 classes, S = 2 -> classes 0..5) split by the mask
    f = src.dataset.factors_of(np.arange(src.dataset.num_grid))
    valid = f[:, 4] <= 5
    assert src._pool_size("eval", 2, 2) == int((valid & mask).sum())
    assert src._pool_size("train", 2, 2) == int((valid & ~mask & ~val_mask).sum())
    assert src._pool_size("val", 2, 2) == int((valid & val_mask).sum())
    # eval_holdout 0 ([ORIGINAL]): eval draws from the training starts
    everything = FactorSequences(src.dataset, PD_TRANSFORMS, eval_holdout=0.0, val_holdout=0.0)
    assert everything.num_train == src.dataset.num_grid
    starts = everything.sample_starts("eval", k, 2, rng)
    assert mask[starts].mean() < 0.4  # not restricted to the other source's held-out cells
    # start "zero" ([ORIGINAL] Shapes3D): the stepped factor always starts at class 0
    zero = FactorSequences(
        src.dataset, PD_TRANSFORMS, start="zero", eval_holdout=0.0, val_holdout=0.0
    )
    f = zero.dataset.factors_of(zero.sample_starts("train", k, 2, rng))
    cols = np.asarray(zero.transform_factors)[k]
    assert (f[np.arange(k.size), cols] == 0).all()


def test_factor_source_errors() -> None:
    ds = ProcDSprites("small")
    with pytest.raises(ValueError, match="unknown factor"):
        FactorSequences(ds, ["size"])
    with pytest.raises(ValueError, match="repeats"):
        FactorSequences(ds, ["scale", 2])
    with pytest.raises(ValueError, match="eval_holdout"):
        FactorSequences(ds, ["scale"], eval_holdout=1.0)
    with pytest.raises(ValueError, match="val_holdout"):
        FactorSequences(ds, ["scale"], eval_holdout=0.5, val_holdout=0.5)
    src = FactorSequences(ds, PD_TRANSFORMS)
    with pytest.raises(ValueError, match="too long for transformation 0 \\(scale\\)"):
        SequenceDataModule(src, [1, 64, 64], seq_len=3)
    with pytest.raises(ValueError, match="image_shape"):
        SequenceDataModule(src, [3, 64, 64], seq_len=2)
    with pytest.raises(ValueError, match="num_transforms=3 does not match"):
        SequenceDataModule(src, [1, 64, 64], seq_len=2, num_transforms=3)
    with pytest.raises(ValueError, match="k_sampling"):
        SequenceDataModule(src, [1, 64, 64], seq_len=2, k_sampling="per_epoch")


# ---------------------------------------------------------------------- samplers / datamodule
def make_dm(source, workers: int = 0, k_sampling: str = "per_batch", **kw) -> SequenceDataModule:
    args = {"seq_len": 2, "batch_size": 8, "epoch_size": 96, "val_per_k": 10, "test_per_k": 6}
    args.update(kw)
    return SequenceDataModule(
        source, source.image_shape, k_sampling=k_sampling, num_workers=workers, **args
    )


def test_k_per_batch_and_per_sample(dsprites_source: FactorSequences) -> None:
    dm = make_dm(dsprites_source, epoch_size=320)
    assert dm.num_transforms == 4 and dm.transform_names == PD_TRANSFORMS
    assert dm.seq_len == dm.eval_seq_len == 2 and dm.image_shape == (1, 64, 64)
    batches = list(dm.train_dataloader())
    assert len(batches) == 40
    ks = [b["k"] for b in batches]
    assert all((k == k[0]).all() for k in ks)  # one k per batch
    counts = np.bincount([int(k[0]) for k in ks], minlength=4)
    assert (counts >= 4).all()  # and every k is drawn (40 batches, 4 transforms)
    per_sample = list(make_dm(dsprites_source, k_sampling="per_sample").train_dataloader())
    assert all(len(set(b["k"].tolist())) > 1 for b in per_sample)
    check_factor_batch(per_sample[0], dsprites_source, 2)


def test_num_workers_give_the_same_consistent_batches(dsprites_source: FactorSequences) -> None:
    serial = list(make_dm(dsprites_source).train_dataloader())
    dm = make_dm(dsprites_source, workers=2)
    loader = dm.train_dataloader()
    parallel = list(loader)
    assert len(parallel) == len(serial) == 12
    for a, b in zip(serial, parallel, strict=True):
        assert torch.equal(a["k"], b["k"]) and torch.equal(a["factors"], b["factors"])
        assert torch.equal(a["frames"], b["frames"])
        assert (b["k"] == b["k"][0]).all()
        check_factor_batch(b, dsprites_source, 2)
    # batches are not duplicated across workers: 12 batches, (almost) all different starts
    starts = torch.cat([b["factors"][:, 0] for b in parallel])
    assert torch.unique(starts, dim=0).shape[0] > 0.8 * starts.shape[0]
    # the next epoch draws new sequences; the evaluation sets stay fixed
    again = list(loader)
    assert not torch.equal(again[0]["factors"], parallel[0]["factors"])
    loader.sampler.set_epoch(0)  # Lightning sets the epoch: epoch 0 again gives epoch 0's draw
    assert torch.equal(next(iter(loader))["factors"], parallel[0]["factors"])
    val1, val2 = list(dm.val_dataloader()), list(dm.val_dataloader())
    assert all(torch.equal(a["factors"], b["factors"]) for a, b in zip(val1, val2, strict=True))


def test_eval_loaders_are_grouped_by_k(dsprites_source: FactorSequences) -> None:
    dm = make_dm(dsprites_source, eval_seq_len=1, test_per_k=20)
    test = list(dm.test_dataloader())
    assert [int(b["k"][0]) for b in test] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert all((b["k"] == b["k"][0]).all() for b in test)
    assert sum(len(b["k"]) for b in test) == 80
    assert test[0]["frames"].shape[1] == 2  # eval_seq_len + 1 frames
    mask = dsprites_source._cell_split == 2
    for b in test:
        check_factor_batch(b, dsprites_source, 1)
        start = dsprites_source.dataset.index_of(b["factors"][:, 0].numpy())
        assert mask[start].all()  # evaluation sequences start only on held-out cells
    one = dm.sequences(k=3, n=5, seed=2)
    assert one["k"].tolist() == [3] * 5 and one["frames"].shape == (5, 2, 1, 64, 64)


def train_starts(dm: SequenceDataModule, batches: int = 3) -> list[list]:
    loader = iter(dm.train_dataloader())
    return [next(loader)["factors"][:, 0].tolist() for _ in range(batches)]


def test_the_run_seed_drives_the_training_draws(
    dsprites_source: FactorSequences, monkeypatch: pytest.MonkeyPatch
) -> None:
    """data.seed null (the configs' default) follows the run seed; an explicit one wins."""
    import lightning as L

    def with_run_seed(run: int, **kw) -> list[list]:
        L.seed_everything(run, verbose=False)  # what train.py does (exports PL_GLOBAL_SEED)
        return train_starts(make_dm(dsprites_source, **kw))

    monkeypatch.setenv("PL_GLOBAL_SEED", "0")  # restored after the test
    run0, run0_again, run1 = with_run_seed(0), with_run_seed(0), with_run_seed(1)
    assert run0 == run0_again
    assert run0 != run1  # a seed sweep feeds every run its own batches
    assert with_run_seed(0, seed=7) == with_run_seed(1, seed=7)  # explicit data.seed wins
    assert with_run_seed(0, seed=7) != run0
    # the evaluation sets do not follow the run seed: every run is evaluated on the same
    L.seed_everything(0, verbose=False)
    val0 = make_dm(dsprites_source).eval_keys("val")
    L.seed_everything(1, verbose=False)
    assert np.array_equal(val0, make_dm(dsprites_source).eval_keys("val"))
    for name in ("proc_dsprites_seq", "proc_digits_seq", "mnist_seq", "shapes3d_seq"):
        data = compose_config("train", [f"data={name}"]).data
        assert data.seed is None and data.source.get("seed", 0) == 0, name  # content stays fixed


def test_validation_and_test_sequences_are_disjoint(dsprites_source: FactorSequences) -> None:
    dm = make_dm(dsprites_source, val_per_k=50, test_per_k=50)
    val, test = dm.eval_keys("val"), dm.eval_keys("test")
    assert val.size == test.size == 200
    assert set(val.tolist()).isdisjoint(test.tolist())
    # nor do they share start configurations across transformations, or with training
    _, val_starts = dsprites_source.split_keys(val)
    _, test_starts = dsprites_source.split_keys(test)
    assert set(val_starts.tolist()).isdisjoint(test_starts.tolist())
    train = np.asarray(train_starts(dm, 6)).reshape(-1, dsprites_source.dataset.num_factors)
    train_cells = set(dsprites_source.dataset.index_of(train).tolist())
    assert train_cells.isdisjoint(val_starts.tolist())
    # image sequences: validation images come from the training part, never from the test split
    images = ImageSequences(lambda p: None, np.zeros(1000), (28, 28), val_fraction=0.05)
    image_dm = SequenceDataModule(images, [3, 28, 28], seq_len=2, val_per_k=None, test_per_k=None)
    _, val_starts = images.split_keys(image_dm.eval_keys("val"))
    _, test_starts = images.split_keys(image_dm.eval_keys("test"))
    assert set(val_starts.tolist()) == set(images.split_positions["val"].tolist())
    assert len(set(val_starts.tolist())) == 50 and len(set(test_starts.tolist())) == 200
    assert set(val_starts.tolist()).isdisjoint(test_starts.tolist())
    assert set(val_starts.tolist()).isdisjoint(images.split_positions["train"].tolist())


# ---------------------------------------------------------------------- image transforms
def bar_image() -> torch.Tensor:
    """A red bar from the centre to the right: asymmetric, so the rotation sense is visible."""
    x = torch.zeros(1, 3, 28, 28)
    x[0, 0, 13:15, 14:25] = 1.0
    return x


def test_rotation_table_is_counter_clockwise_quarter_turn() -> None:
    src = ImageSequences(lambda p: None, np.zeros(10), (28, 28))
    frames = src.apply(bar_image(), np.array([1]), steps=9)  # rotation 10t degrees, t = 9
    assert torch.equal(frames[0, 0], bar_image()[0])  # step 0 is the identity, bit-exact
    quarter = torch.rot90(bar_image()[0], 1, dims=(-2, -1))  # counter-clockwise on screen
    assert torch.allclose(frames[0, 9], quarter, atol=1e-5)
    assert frames[0, 9, 0, :13, 13:15].sum() > 15  # the bar now points up
    assert frames[0, 9, 0, 15:, :].sum() < 1e-4
    # 45 degrees: the bar's tip lies up and to the right
    mid = affine_warp(bar_image(), torch.tensor([1.0]), torch.tensor([45.0]))[0, 0]
    assert mid[4:9, 19:24].sum() > 2.0 and mid[19:24, 19:24].sum() < 1e-4


def test_scale_table_matches_analytic_zoom() -> None:
    """Bilinear zoom of a linear ramp is exact: I_s(x) = I((x - c) / s + c)."""
    j = torch.arange(28, dtype=torch.float32)
    ramp = ((j - 13.5) / 28 + 0.5).expand(28, 28)
    x = torch.stack([ramp, torch.zeros_like(ramp), torch.zeros_like(ramp)])[None]
    src = ImageSequences(lambda p: None, np.zeros(10), (28, 28))
    frames = src.apply(x, np.array([0]), steps=8)
    for t in (1, 5, 8):
        s = 1.0 + 0.1 * t
        expected = ((j - 13.5) / s / 28 + 0.5).expand(28, 28)
        assert torch.allclose(frames[0, t, 0, 4:24, 4:24], expected[4:24, 4:24], atol=1e-5)
    # a centred square grows: its ink area scales as s^2
    square = torch.zeros(1, 3, 28, 28)
    square[0, 0, 10:18, 10:18] = 1.0
    grown = src.apply(square, np.array([0]), steps=8)[0, :, 0].sum(dim=(1, 2))
    assert torch.allclose(grown[5] / grown[0], torch.tensor(1.5**2), rtol=0.02)


def test_hue_table_rotates_pure_red() -> None:
    x = torch.zeros(1, 3, 28, 28)
    x[0, 0] = 1.0  # pure red
    x[0, 0, :, :14] = 0.5  # dark red on the left half
    src = ImageSequences(lambda p: None, np.zeros(10), (28, 28))
    frames = src.apply(x, np.array([2]), steps=8)  # hue 20t degrees
    right = frames[0, :, :, 5, 20]  # (S+1, 3) colour of one pure-red pixel
    assert torch.allclose(right[1], torch.tensor([1.0, 1 / 3, 0.0]), atol=1e-5)  # 20 deg
    assert torch.allclose(right[6], torch.tensor([0.0, 1.0, 0.0]), atol=1e-5)  # 120: green
    assert torch.allclose(right[8], torch.tensor([0.0, 1.0, 2 / 3]), atol=1e-5)  # 160
    assert torch.allclose(frames[0, 6, :, 5, 3], torch.tensor([0.0, 0.5, 0.0]), atol=1e-5)
    # brightness (HSV value) is kept and black stays black
    assert torch.allclose(frames.amax(dim=2), x.amax(dim=1).expand(1, 9, 28, 28))
    # step 0 is x_0 itself, bit-exact, for every transformation
    for k in range(3):
        assert torch.equal(src.apply(x, np.array([k]), steps=2)[0, 0], x[0])
    # round trip RGB -> HSV -> RGB, and a full turn is the identity
    colours = torch.rand(4, 3, 5, 5)
    assert torch.allclose(hsv_to_rgb(rgb_to_hsv(colours)), colours, atol=1e-5)
    assert torch.allclose(hue_rotate(colours, torch.full((4,), 360.0)), colours, atol=1e-5)


# ---------------------------------------------------------------------- MNIST-like sources
def test_proc_digits_sequences() -> None:
    src = ProcDigitsSequences(seed=0)
    assert src.num_train == 46_800 and src.split_positions["eval"].size == 12_000
    assert src.split_positions["val"].size == 1_200  # carved from the 48k training part
    assert set(src.split_positions["train"]).isdisjoint(src.split_positions["eval"][:500])
    dm = SequenceDataModule(src, [3, 28, 28], seq_len=8, eval_seq_len=7, batch_size=6)
    assert dm.num_transforms == 3 and dm.transform_names == ["scale", "rotation", "hue"]
    assert dm.factor_names == ["label", "scale", "rotation", "hue"]
    batch = dm.sequences(k=1, n=6, steps=8)
    frames, factors = batch["frames"], batch["factors"]
    assert frames.shape == (6, 9, 3, 28, 28) and factors.shape == (6, 9, 4)
    assert torch.equal(factors[:, :, 2], torch.arange(9).expand(6, -1))  # rotation step t
    assert not factors[:, :, [1, 3]].any() and (factors[:, :, 0] == factors[:, :1, 0]).all()
    # red digits: frame 0 is (x, 0, 0) of the grey digit; rotations keep the ink roughly
    starts = src.split_keys(dm.eval_keys("test"))[1]
    assert dm.eval_keys("test").size == 3 * 12_000
    grey = src.digits.get_batch(np.sort(starts[:4]))[0]
    test_batch = next(iter(dm.test_dataloader()))
    assert torch.equal(test_batch["frames"][:4, 0, 0], grey[:, 0])
    assert test_batch["frames"].shape[1] == 8 and (test_batch["k"] == 0).all()
    assert not frames[:, :, 1:].any()  # rotation keeps the digits red
    ink = frames.sum(dim=(2, 3, 4))
    assert ((ink[:, 1:] / ink[:, :1] - 1).abs() < 0.2).all()
    assert (frames[:, 1:] != frames[:, :1]).flatten(2).any(-1).all()  # every frame moves
    hue = dm.sequences(k=2, n=4, steps=8)["frames"]
    assert hue[:, 8, 1].sum() > 0 and hue[:, 8, 0].sum() < 1e-3 * hue[:, 0, 0].sum() + 1e-6


def write_mnist_raw(root: Path, n_train: int = 50, n_test: int = 10) -> tuple[np.ndarray, ...]:
    """A tiny MNIST in torchvision's raw layout (uncompressed IDX files)."""
    rng = np.random.default_rng(0)
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    out = []
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        header = struct.pack(">IIII", 0x803, n, 28, 28)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(header + images.tobytes())
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(
            struct.pack(">II", 0x801, n) + labels.tobytes()
        )
        out += [images, labels]
    return tuple(out)


def test_mnist_sequences_from_raw_folder(tmp_path: Path) -> None:
    images, labels, _, _ = write_mnist_raw(tmp_path)
    src = MNISTSequences(tmp_path, download=False)
    assert src.num_train == 39 and src.split_positions["eval"].size == 10
    assert src.split_positions["val"].size == 1
    k = np.array([0, 1, 2, 2])
    starts = np.array([3, 0, 49, 7])
    batch = src.render(k, starts, steps=7)
    assert torch.equal(batch["frames"][:, 0, 0], torch.from_numpy(images[starts]) / 255.0)
    assert not batch["frames"][:, 0, 1:].any()  # made red: (x, 0, 0)
    assert batch["factors"][:, 0, 0].tolist() == labels[starts].tolist()
    # through the config, as a user would run it
    cfg = compose_config("train", ["data=mnist_seq", f"paths.data_dir={tmp_path}"])
    with open_dict(cfg):
        cfg.data.source.download = False
        cfg.data.batch_size = 4
    dm = instantiate_datamodule(cfg.data)
    assert dm.seq_len == 8 and dm.eval_seq_len == 7 and dm.image_shape == (3, 28, 28)
    assert len(dm.train_dataloader()) == 9  # 39 training images, batch 4
    train = next(iter(dm.train_dataloader()))
    assert train["frames"].shape == (4, 9, 3, 28, 28) and (train["k"] == train["k"][0]).all()
    assert sum(len(b["k"]) for b in dm.test_dataloader()) == 30  # whole 10-image split per k


def test_mnist_missing_gives_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError) as info:
        MNISTSequences(tmp_path / "nowhere", download=False)
    message = str(info.value)
    assert str(tmp_path / "nowhere" / "MNIST" / "raw") in message
    assert "train-images-idx3-ubyte" in message and "download=true" in message


# ---------------------------------------------------------------------- real-format 3D sets
def test_shapes3d_sequences_from_h5(tmp_path: Path) -> None:
    sizes = (3, 3, 3, 3, 2, 3)
    written = write_shapes3d(tmp_path, sizes=sizes)
    ds = Shapes3D(tmp_path, checksum=None, factor_sizes=sizes, progress=False)
    src = FactorSequences(
        ds, ["floor_hue", "wall_hue", "object_hue", "scale", "orientation"], eval_holdout=0.1
    )
    assert src.transform_factors == (0, 1, 2, 3, 5) and src.num_transforms == 5
    dm = make_dm(src, k_sampling="per_sample", batch_size=32)
    batch = next(iter(dm.train_dataloader()))
    check_factor_batch(batch, src, 2)
    # frames are the file's images at the frames' factors (index from an independent ravel)
    idx = np.ravel_multi_index(tuple(batch["factors"].reshape(-1, 6).numpy().T), sizes)
    file_images = torch.from_numpy(written["images"][idx]).permute(0, 3, 1, 2) / 255.0
    assert torch.equal(batch["frames"].reshape(-1, 3, 64, 64), file_images)


@pytest.mark.parametrize(
    ("cls", "sizes", "factors", "steps"),
    [
        (Falcor3D, (2, 2, 2, 2, 2, 2, 2), slice(0, 7), 1),
        (Isaac3D, (2, 2, 2, 2, 2, 2, 2, 2, 2), slice(1, 9), 1),
    ],
)
def test_nvidia3d_sequences_without_mod_trick(tmp_path: Path, cls, sizes, factors, steps) -> None:
    n = int(np.prod(sizes))
    array = np.random.default_rng(0).integers(0, 256, size=(n, 8, 8, 3), dtype=np.uint8)
    np.save(tmp_path / f"{cls.NAME}_8.npy", array)
    ds = cls(tmp_path, resolution=8, factor_sizes=sizes)
    src = FactorSequences(ds, list(ds.factor_names[factors]), eval_holdout=0.1)
    assert src.num_transforms == len(sizes) - factors.start
    dm = make_dm(src, seq_len=steps, k_sampling="per_sample", batch_size=64)
    batch = next(iter(dm.train_dataloader()))
    check_factor_batch(batch, src, steps)
    idx = np.ravel_multi_index(tuple(batch["factors"].reshape(-1, len(sizes)).numpy().T), sizes)
    assert torch.equal(
        batch["frames"].reshape(-1, 3, 8, 8), torch.from_numpy(array[idx]).permute(0, 3, 1, 2) / 255
    )
    # factor 0 is not pinned to 0 (the original's mod trick) when another factor is stepped
    first = batch["factors"][:, 0, 0][batch["k"] != 0]
    assert set(first.tolist()) == {0, 1}


# ---------------------------------------------------------------------- configs
@pytest.mark.parametrize(
    ("name", "overrides", "shape"),
    [
        ("proc_dsprites_seq", ["data.source.dataset.size=small", "data.seq_len=2"], (1, 64, 64)),
        ("proc_shapes3d_seq", ["data.source.dataset.size=small", "data.seq_len=2"], (3, 64, 64)),
        ("proc_digits_seq", [], (3, 28, 28)),
    ],
)
def test_procedural_configs(name: str, overrides: list[str], shape: tuple) -> None:
    cfg = compose_config("train", [f"data={name}", "data.batch_size=4", *overrides])
    dm = instantiate_datamodule(cfg.data)  # checks data.num_transforms against the source
    assert dm.k_sampling == "per_batch" and dm.image_shape == shape
    assert dm.num_transforms == cfg.data.num_transforms
    batch = next(iter(dm.train_dataloader()))
    assert batch["frames"].shape == (4, dm.seq_len + 1, *shape)
    assert (batch["k"] == batch["k"][0]).all()


def test_real_configs_compose_with_spec_settings() -> None:
    expect = {
        "mnist_seq": (3, 8, 7),
        "shapes3d_seq": (5, 7, 7),
        "falcor3d_seq": (7, 4, 4),
        "isaac3d_seq": (8, 3, 3),
    }
    for name, (k, s, s_eval) in expect.items():
        data = compose_config("train", [f"data={name}"]).data
        assert data.seq_len == s and data.eval_seq_len == s_eval and data.batch_size == 128
        names = data.source.get("transform_factors", data.source.get("transforms"))
        assert len(names) == k == data.num_transforms, name
    isaac = compose_config("train", ["data=isaac3d_seq"]).data
    assert "object_shape" not in isaac.source.transform_factors
    assert list(isaac.image_shape) == [3, 128, 128]


DDP_SCRIPT = """
import json, sys, torch, lightning as L
from latentzoo.data import SequenceDataModule
from latentzoo.data.datasets import FactorSequences, ProcDSprites


class Probe(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.seen = []

    def training_step(self, batch, i):
        assert (batch["k"] == batch["k"][0]).all()
        self.seen.append(batch["factors"][:, 0].tolist())
        return (self.w - batch["frames"].mean()) ** 2

    def on_train_end(self):
        with open(f"{sys.argv[1]}/rank{self.global_rank}.json", "w") as f:
            json.dump(self.seen, f)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


if __name__ == "__main__":
    torch.set_num_threads(1)
    src = FactorSequences(ProcDSprites("small"), ["scale", "orientation", "posX", "posY"])
    dm = SequenceDataModule(src, [1, 64, 64], seq_len=2, batch_size=8, epoch_size=64)
    trainer = L.Trainer(
        accelerator="cpu", strategy="ddp", devices=2, max_epochs=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(Probe(), dm)
"""


@pytest.mark.slow
def test_ddp_ranks_get_disjoint_batches(tmp_path: Path) -> None:
    """Under DDP Lightning wraps the batch sampler and deals its 8 batches out to 2 ranks."""
    import json
    import os
    import subprocess
    import sys

    script = tmp_path / "ddp_probe.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    run = subprocess.run(
        [sys.executable, str(script), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    seen = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert len(seen[0]) == len(seen[1]) == 4  # 8 batches per epoch, 4 per rank
    batches = [tuple(map(tuple, b)) for rank in seen for b in rank]
    assert len(set(batches)) == 8  # no batch is seen twice
