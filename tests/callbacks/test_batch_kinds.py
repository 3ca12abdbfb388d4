"""The image callbacks take every batch kind the datamodules yield (image tensors, ``(x, y)``,
``{"image", ...}`` dicts, sequences) or skip with one warning (a latent cache); the sample grid
is sized to the device; a stop signal aborts sampling and the run stops with last.ckpt."""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

import lightning as L
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from latentzoo.callbacks import (
    Checkpoints,
    FlowPaths,
    LatentTraversalGrid,
    ReconstructionGrid,
    SampleGrid,
)
from latentzoo.callbacks.images import batch_images
from latentzoo.callbacks.interrupt import SamplingInterrupted, abort_on_stop
from latentzoo.models.latent_flow import SequenceBatch
from tests.callbacks.test_images import SIZE, SamplingModel, TwoLatentModel

IMAGES = torch.rand(6, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
FRAMES = torch.stack([IMAGES, 1 - IMAGES, IMAGES / 2], dim=1)  # (B, S+1, C, H, W)
LABELS = torch.arange(6)
KINDS = {
    "tensor": IMAGES,
    "tuple": (IMAGES, LABELS),
    "list": [IMAGES, LABELS],
    "dict_image": {"image": IMAGES, "label": LABELS},
    "dict_images": {"images": IMAGES},
    "sequence_dict": {"frames": FRAMES, "k": LABELS, "factors": LABELS},
    "sequence_tuple": SequenceBatch(FRAMES, LABELS),
}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_batch_images_of_every_kind(kind: str) -> None:
    images = batch_images(KINDS[kind])
    assert images is not None and torch.equal(images, IMAGES)  # sequences: their first frames


@pytest.mark.parametrize(
    "batch", [{"latent": torch.randn(6, 4, 2, 2), "label": LABELS}, torch.randn(6, 10), "text"]
)
def test_batches_without_images_give_none(batch) -> None:
    assert batch_images(batch) is None


class Batches(Dataset):
    """One item per index, collated into the batch kind under test."""

    def __init__(self, kind: str) -> None:
        self.kind = kind

    def __len__(self) -> int:
        return len(IMAGES)

    def __getitem__(self, index: int):
        if self.kind == "sequence_dict":
            return {"frames": FRAMES[index], "k": LABELS[index]}
        if self.kind == "dict_image":
            return {"image": IMAGES[index], "label": LABELS[index]}
        if self.kind == "latent":
            return {"latent": torch.randn(2), "label": LABELS[index]}
        return IMAGES[index], LABELS[index]


class AnyBatchModel(TwoLatentModel):
    def training_step(self, batch, batch_idx):
        images = batch_images(batch)
        if images is None:  # latents: train the decoder's scale only
            return self.scale.pow(2)
        return ((self.decode(self.encode(images)) - images) ** 2).mean()


def fit(kind: str, callbacks: list[L.Callback], tmp_path: Path, model=None, max_steps: int = 2):
    trainer = L.Trainer(
        max_steps=max_steps,
        callbacks=callbacks,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=any(isinstance(c, Checkpoints) for c in callbacks),
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=1,
        default_root_dir=tmp_path,
    )
    loader = DataLoader(Batches(kind), batch_size=3)
    trainer.fit(model or AnyBatchModel(), loader, loader)
    return trainer


@pytest.mark.parametrize("kind", ["tuple", "dict_image", "sequence_dict"])
def test_grids_draw_from_every_batch_kind(kind: str, tmp_path: Path) -> None:
    images = tmp_path / "images"
    callbacks = [
        ReconstructionGrid(str(images), every_n_steps=1, num_images=2),
        LatentTraversalGrid(str(images), every_n_steps=0, num_steps=3, gif=False),
    ]
    fit(kind, callbacks, tmp_path)
    with Image.open(images / "reconstructions_step000002.png") as png:
        assert png.size == (2 * (SIZE + 2) + 2, 2 * (SIZE + 2) + 2)
    assert (images / "traversals_step000002.png").exists()
    assert all(callback._enabled for callback in callbacks)


def test_latent_batches_skip_the_data_grids_with_one_warning(tmp_path: Path, caplog) -> None:
    images = tmp_path / "images"
    callbacks = [
        ReconstructionGrid(str(images), every_n_steps=1),
        LatentTraversalGrid(str(images), every_n_steps=1),
    ]
    with caplog.at_level(logging.WARNING):
        fit("latent", callbacks, tmp_path, max_steps=3)
    warnings = [r.getMessage() for r in caplog.records if "disabled" in r.getMessage()]
    assert len(warnings) == 2, warnings  # one per image grid, not one per step
    assert all("dict{latent, label}" in w and "no images" in w for w in warnings)
    assert not images.exists() or not list(images.glob("*.png"))
    assert not any(callback._enabled for callback in callbacks)


def test_flow_paths_skip_non_sequence_data_with_one_warning(tmp_path: Path, caplog) -> None:
    class FlowLike(AnyBatchModel):
        num_transforms = 2

        def transform(self, x, k, steps):
            return x.expand(steps + 1, *x.shape)

    callback = FlowPaths(str(tmp_path / "images"), every_n_steps=1)
    with caplog.at_level(logging.WARNING):
        fit("tuple", [callback], tmp_path, model=FlowLike(), max_steps=3)
    warnings = [r.getMessage() for r in caplog.records if "FlowPaths disabled" in r.getMessage()]
    assert len(warnings) == 1 and "no sequences" in warnings[0]
    assert not callback._enabled


class SolverModel(SamplingModel):
    """``sample`` takes a solver and a step count, as latent_fm's does; records the call."""

    calls: list

    def sample(self, n: int, sampler: str | None = None, steps: int | None = None):
        self.calls = [*getattr(self, "calls", []), (n, sampler, steps)]
        return super().sample(n)


def test_sample_grid_on_cpu_caps_images_and_sets_the_solver(tmp_path: Path) -> None:
    grid = SampleGrid(
        str(tmp_path),
        num_images=64,
        sampler="dopri5",
        on_cpu={"num_images": 4, "sampler": "euler", "steps": 3},
    )
    model = SolverModel()
    out = grid.draw(model, torch.empty(0))
    assert model.calls == [(4, "euler", 3)]
    assert out.shape[-1] == 2 * (SIZE + 2) + 2  # 2 x 2 grid
    assert grid.settings(torch.device("cuda"))["num_images"] == 64  # GPU: as configured
    assert grid.settings(torch.device("cuda"))["sampler"] == "dopri5"
    # a smaller num_images stays; a model whose sample() takes no solver gets none
    small = SampleGrid(str(tmp_path), num_images=2, on_cpu={"num_images": 16, "sampler": "euler"})
    one_column_of_two = (2 * (SIZE + 2) + 2, SIZE + 4)
    assert small.draw(SamplingModel(), torch.empty(0)).shape[-2:] == one_column_of_two
    with pytest.raises(ValueError, match="on_cpu"):
        SampleGrid(str(tmp_path), on_cpu={"solver": "euler"})


def test_abort_on_stop_raises_at_the_next_forward() -> None:
    class Flag(L.Callback):
        stop_requested = False

    flag = Flag()
    trainer = type("T", (), {"callbacks": [flag]})()
    net = torch.nn.Linear(2, 2)
    with abort_on_stop(trainer):
        net(torch.zeros(1, 2))  # no signal: runs
        flag.stop_requested = True
        with pytest.raises(SamplingInterrupted):
            net(torch.zeros(1, 2))
    net(torch.zeros(1, 2))  # the hook is gone after the block


class SignalledSampler(AnyBatchModel):
    """``sample`` is a long loop of net evaluations; SIGTERM arrives during the third one."""

    forwards = 0

    def sample(self, n: int) -> torch.Tensor:
        z = torch.randn(n, 2)
        for i in range(10_000):
            if i == 2:
                os.kill(os.getpid(), signal.SIGTERM)
            z = self.encoder(torch.nn.functional.pad(z, (0, SIZE * SIZE - 2)))
            self.forwards += 1
        return self.decode(z)


def test_sigterm_during_the_final_sample_grid_stops_it_and_saves(tmp_path: Path) -> None:
    checkpoints = Checkpoints(dirpath=str(tmp_path / "ckpt"), every_n_train_steps=None)
    grid = SampleGrid(str(tmp_path / "images"), every_n_steps=0, num_images=2)
    model = SignalledSampler()
    fit("tuple", [grid, checkpoints], tmp_path, model=model, max_steps=2)
    assert model.forwards <= 3  # aborted at the forward after the signal, not after 10k
    assert not (tmp_path / "images").exists()  # the interrupted grid is skipped
    name, signum, path, step = checkpoints.stopped_by  # -> exit 143 with the resume command
    assert (name, signum, step) == ("SIGTERM", signal.SIGTERM, 2)
    assert Path(path).name == "last.ckpt" and Path(path).exists()
    assert signal.getsignal(signal.SIGTERM) is not checkpoints._handle_signal  # restored


def test_fid_callback_on_cpu_caps_sizes_and_sets_the_solver() -> None:
    from latentzoo.callbacks.fid import FIDCallback

    cpu = {"num_samples": 500, "sampler": "euler", "steps": 16, "reference_num_images": 2000}
    flow = FIDCallback(num_samples=5000, sampler="dopri5", on_cpu=cpu)
    flow._size_to_device(SolverModel())
    assert (flow.num_samples, flow.reference_num_images) == (500, 2000)
    assert flow.sample_kwargs["sampler"] == "euler" and flow.sample_kwargs["steps"] == 16
    vae = FIDCallback(num_samples=48, on_cpu=cpu)  # smaller stays; sample() takes no solver
    vae._size_to_device(SamplingModel())
    assert vae.num_samples == 48 and vae.sample_kwargs["sampler"] is None
    with pytest.raises(ValueError, match="on_cpu"):
        FIDCallback(on_cpu={"extractor": "tiny"})
