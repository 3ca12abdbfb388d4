"""FlowPaths writes a PNG grid and a GIF with one frame per step for every transformation."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import hydra
import torch
from PIL import Image

from latentzoo.callbacks import FlowPaths
from tests.conftest import compose_config
from tests.models.test_latent_flow import SequenceData, tiny_flow


def test_flow_paths_writes_grids_and_gifs(tmp_path: Path) -> None:
    torch.manual_seed(0)
    steps, num_images = 3, 2
    data = SequenceData(num_k=2, steps=steps, batch=4)
    model = tiny_flow(steps=steps)
    trainer = SimpleNamespace(
        global_step=7, loggers=[], val_dataloaders=data.val_dataloader(), datamodule=data
    )
    callback = FlowPaths(dirpath=str(tmp_path / "images"), num_images=num_images)
    callback.on_train_end(trainer, model)
    for k in (0, 1):
        gif = tmp_path / "images" / f"flow_k{k}_step000007.gif"
        png = gif.with_suffix(".png")
        assert gif.exists() and png.exists()
        with Image.open(gif) as image:
            assert image.n_frames == steps + 1
            # each frame: 2 rows (true, decoded) of num_images 28-px images with 2-px padding
            assert image.size == (num_images * 30 + 2, 2 * 30 + 2)
        with Image.open(png) as grid:  # row pairs per sequence, S + 1 columns
            assert grid.size == ((steps + 1) * 30 + 2, 2 * num_images * 30 + 2)
    assert model.training  # restored


def test_flow_paths_config_instantiates(tmp_path: Path) -> None:
    cfg = compose_config("train", ["callbacks=flow_paths"], tmp_path)
    assert "reconstruction_grid" not in cfg.callbacks
    callback = hydra.utils.instantiate(cfg.callbacks.flow_paths)
    assert isinstance(callback, FlowPaths) and callback.dirpath == tmp_path / "images"
