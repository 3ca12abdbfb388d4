"""Reconstruction / traversal images: PNGs and per-dimension GIFs from a tiny real Trainer."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import Logger, TensorBoardLogger
from PIL import Image, ImageSequence
from torch.utils.data import DataLoader, TensorDataset

from latentzoo.callbacks import LatentTraversalGrid, ReconstructionGrid, SampleGrid
from latentzoo.callbacks.images import traversal_values

SIZE = 8  # 1 x 8 x 8 images


class TwoLatentModel(L.LightningModule):
    """A 2-d code whose decoder uses dimension 0 (the brightness of a pattern) and ignores
    dimension 1, so traversing 0 must change the pictures and traversing 1 must not."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = torch.nn.Linear(SIZE * SIZE, 2)
        pattern = torch.linspace(0, 1, SIZE * SIZE).reshape(1, 1, SIZE, SIZE)
        self.register_buffer("pattern", pattern)
        self.scale = torch.nn.Parameter(torch.ones(()))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x.flatten(1))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.scale * z[:, :1, None, None] * 4 * (self.pattern - 0.5))

    def training_step(self, batch, batch_idx):
        (x,) = batch
        return ((self.decode(self.encode(x)) - x) ** 2).mean()

    def validation_step(self, batch, batch_idx):
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class EncodeOnly(L.LightningModule):
    """A model with ``encode`` but no ``decode``: nothing to draw."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = torch.nn.Linear(SIZE * SIZE, 2)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x.flatten(1))

    def training_step(self, batch, batch_idx):
        return self.encode(batch[0]).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def fit(
    callbacks: list[L.Callback],
    tmp_path: Path,
    max_steps: int = 3,
    model: L.LightningModule | None = None,
    logger: Logger | bool = False,
) -> None:
    data = TensorDataset(torch.rand(24, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(0)))
    trainer = L.Trainer(
        max_steps=max_steps,
        callbacks=callbacks,
        accelerator="cpu",
        logger=logger,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=1,
        default_root_dir=tmp_path,
    )
    loaders = DataLoader(data, batch_size=6), DataLoader(data, batch_size=12)
    trainer.fit(model or TwoLatentModel(), *loaders)


def gif_frames(path: Path) -> list[np.ndarray]:
    with Image.open(path) as gif:
        return [np.asarray(frame.convert("RGB")) for frame in ImageSequence.Iterator(gif)]


def test_traversal_png_and_gifs_at_train_end(tmp_path: Path) -> None:
    images = tmp_path / "images"
    traversal = LatentTraversalGrid(str(images), every_n_steps=0, num_steps=5, num_images=3)
    fit([traversal, ReconstructionGrid(str(images), every_n_steps=0, num_images=4)], tmp_path)

    with Image.open(images / "traversals_step000003.png") as png:  # written at the end: step 3
        # 2 rows (dims) x 5 columns of 8x8 images, 2 px padding
        assert png.size == (5 * (SIZE + 2) + 2, 2 * (SIZE + 2) + 2)
    with Image.open(images / "reconstructions_step000003.png") as png:
        assert png.size == (4 * (SIZE + 2) + 2, 2 * (SIZE + 2) + 2)  # inputs over reconstructions

    gifs = sorted((images / "traversals_step000003").glob("*.gif"))
    assert [p.name for p in gifs] == ["dim00.gif", "dim01.gif"]
    grid_h, grid_w = SIZE + 4, 3 * (SIZE + 2) + 2  # 3 images side by side
    used, ignored = gif_frames(gifs[0]), gif_frames(gifs[1])
    assert len(used) == len(ignored) == 5
    assert used[0].shape == (grid_h + 3, grid_w, 3)  # + the 3-px position bar
    with Image.open(gifs[0]) as gif:
        assert gif.info["duration"] == 200 and gif.info["loop"] == 0  # fps=5, looping

    pictures = [frame[:grid_h] for frame in used]
    steps = [
        np.abs(a.astype(int) - b).mean() for a, b in zip(pictures[:-1], pictures[1:], strict=True)
    ]
    assert min(steps) > 1.0  # the decoder reads dimension 0: every step changes the picture
    assert all(np.array_equal(frame[:grid_h], ignored[0][:grid_h]) for frame in ignored)
    # the bar below marks the position in the sweep
    bar_fill = [(frame[grid_h:] == 255).all(axis=(0, 2)).sum() for frame in used]
    assert bar_fill == sorted(bar_fill) and bar_fill[-1] == grid_w


def test_periodic_writes_options_and_png_only(tmp_path: Path) -> None:
    images = tmp_path / "images"
    traversal = LatentTraversalGrid(
        str(images), every_n_steps=2, num_steps=3, max_dims=1, quantile=0.1, fps=10
    )
    plain = LatentTraversalGrid(str(tmp_path / "plain"), every_n_steps=0, num_steps=3, gif=False)
    tensorboard = TensorBoardLogger(str(tmp_path), name="tb")
    fit([traversal, plain], tmp_path, max_steps=4, logger=tensorboard)
    # every 2 steps; the end of training at step 4 is not drawn twice
    assert sorted(p.name for p in images.glob("*.png")) == [
        "traversals_step000002.png",
        "traversals_step000004.png",
    ]
    assert [p.name for p in (images / "traversals_step000004").iterdir()] == ["dim00.gif"]
    assert len(gif_frames(images / "traversals_step000004" / "dim00.gif")) == 3
    assert list((tmp_path / "plain").glob("*.png")) and not list(
        (tmp_path / "plain").rglob("*.gif")
    )


def test_traversal_values_prior_and_posterior_quantiles() -> None:
    codes = torch.stack([torch.arange(101.0), 10 * torch.arange(101.0)], dim=1)  # [101, 2]
    prior = traversal_values(codes, 5, limit=2.0, quantile=None)
    assert torch.allclose(prior, torch.tensor([-2.0, -1.0, 0.0, 1.0, 2.0]).expand(2, 5))
    posterior = traversal_values(codes, 3, limit=2.0, quantile=0.1)
    assert torch.allclose(posterior, torch.tensor([[10.0, 50.0, 90.0], [100.0, 500.0, 900.0]]))


def test_model_without_decode_is_skipped(tmp_path: Path) -> None:
    callbacks = [
        LatentTraversalGrid(str(tmp_path / "images"), every_n_steps=1),
        ReconstructionGrid(str(tmp_path / "images"), every_n_steps=1),
    ]
    fit(callbacks, tmp_path, max_steps=2, model=EncodeOnly())
    assert not (tmp_path / "images").exists()
    assert not any(callback._enabled for callback in callbacks)


def test_code_that_is_not_a_vector_is_skipped(tmp_path: Path) -> None:
    class GridCode(TwoLatentModel):
        def encode(self, x: torch.Tensor) -> torch.Tensor:
            return super().encode(x)[:, :, None]  # [B, 2, 1]: e.g. a set of particles

        def decode(self, z: torch.Tensor) -> torch.Tensor:
            return super().decode(z.flatten(1))

    callback = LatentTraversalGrid(str(tmp_path / "images"), every_n_steps=1)
    fit([callback], tmp_path, max_steps=2, model=GridCode())
    assert not callback._enabled and not list(tmp_path.rglob("*.gif"))


def test_bad_options_fail_clearly() -> None:
    with pytest.raises(ValueError, match="quantile"):
        LatentTraversalGrid("x", quantile=0.7)
    with pytest.raises(ValueError, match="num_steps"):
        LatentTraversalGrid("x", num_steps=1)


class SamplingModel(TwoLatentModel):
    """TwoLatentModel with a prior: ``sample(n)`` decodes standard-normal codes."""

    def sample(self, n: int) -> torch.Tensor:
        return self.decode(torch.randn(n, 2, device=self.device))


def test_sample_grid_is_seeded_and_leaves_the_training_rng_alone(tmp_path: Path) -> None:
    images = tmp_path / "images"
    grid = SampleGrid(str(images), every_n_steps=2, num_images=9, seed=3)
    fit([grid], tmp_path, max_steps=4, model=SamplingModel())
    first = np.asarray(Image.open(images / "samples_step000002.png"))
    last = np.asarray(Image.open(images / "samples_step000004.png"))
    assert first.shape[:2] == (3 * (SIZE + 2) + 2, 3 * (SIZE + 2) + 2)  # 3 x 3 samples
    assert first.std() > 0  # samples differ from each other

    model = SamplingModel()
    torch.manual_seed(0)
    expected_next = torch.rand(3)
    torch.manual_seed(0)
    again = grid.draw(model, torch.empty(0))
    assert torch.equal(torch.rand(3), expected_next)  # drawing did not consume the global RNG
    assert torch.equal(again, grid.draw(model, torch.empty(0)))  # same seed, same samples
    assert first.shape == last.shape


def test_sample_grid_skips_models_without_sample(tmp_path: Path) -> None:
    fit([SampleGrid(str(tmp_path / "images"), every_n_steps=1)], tmp_path, max_steps=2)
    assert not list((tmp_path / "images").glob("samples_*.png"))
