"""``data.render_on_device``: proc_dsprites renders a batch on the model's device after transfer
(GPU path), with the same images, batch for batch, as the CPU loader. On a CPU-only machine the
"device" is the CPU (the plumbing); the CUDA case runs where a GPU is present."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate

from latentzoo.data.datasets import ProcDSprites, ProcShapes3D
from latentzoo.data.ground_truth import GroundTruthDataModule
from latentzoo.utils.distributed import resolve_batch_size
from latentzoo.utils.errors import LatentzooError
from tests.conftest import compose_config

DEVICES = [
    "cpu",
    pytest.param(
        "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
    ),
]


@pytest.mark.parametrize("device", DEVICES)
def test_device_renderer_equals_the_cpu_renderer_pixel_for_pixel(device: str) -> None:
    ds = ProcDSprites("small")
    factors = ds.factors_of(np.random.default_rng(0).permutation(len(ds))[:300])
    expected = ds.images_of(factors)
    images = ds.images_on_device(torch.from_numpy(factors).to(device))
    assert images.device.type == device and images.dtype == torch.float32
    assert torch.equal(images.cpu(), expected)
    assert expected.sum() > 0


def _datamodule(render_on_device: bool) -> GroundTruthDataModule:
    cfg = compose_config(
        "train",
        [
            "data=proc_dsprites",
            "data.dataset.size=small",
            "data.val_size=32",
            "data.test_size=32",
            "data.batch_size=16",
            f"data.render_on_device={str(render_on_device).lower()}",
        ],
    )
    dm = instantiate(resolve_batch_size(cfg.data, 1))
    dm.setup("fit")
    return dm


def test_loader_with_rendering_after_transfer_yields_the_same_batches() -> None:
    plain, deferred = _datamodule(False), _datamodule(True)
    plain_batches = list(zip(range(5), plain.train_dataloader(), strict=False))
    for (_, expected), (_, raw) in zip(
        plain_batches, zip(range(5), deferred.train_dataloader(), strict=False), strict=True
    ):
        assert raw[0] is None  # only the factors cross to the device
        images, factors = deferred.on_after_batch_transfer(raw, 0)
        assert torch.equal(factors, expected[1]) and torch.equal(images, expected[0])
    # other batches (val/test) pass through unchanged
    batch = next(iter(deferred.val_dataloader()))
    assert deferred.on_after_batch_transfer(batch, 0) is batch


def test_render_on_device_needs_a_renderer_that_can(tmp_path: Path) -> None:
    with pytest.raises(LatentzooError, match="render_on_device"):
        GroundTruthDataModule(
            ProcShapes3D("small"), [3, 64, 64], val_size=8, test_size=8, render_on_device=True
        )
