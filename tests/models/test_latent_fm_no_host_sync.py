"""The latent_fm training step (loss, backward, optimizer step, EMA update) reads nothing back
to the host after the first batch: on a GPU each ``.item()`` / ``float(t)`` / ``bool(t)`` /
``.tolist()`` would stall the CPU until the GPU catches up. On the CPU we catch them in Python:
the tensor methods that copy a value to the host raise during steps 2..4, and on CUDA (the GPU
suite) ``torch.cuda.set_sync_debug_mode("error")`` does the same for every sync."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate

from tests.conftest import compose_config

OVERRIDES = [
    "experiment=latent_fm_proc_blobs",
    "model/backbone=dit_tiny",
    "model.backbone.patch_size=4",
    "model/autoencoder=identity",
    "model.ema_decay=0.9",
    "data.image_size=16",
]
HOST_READS = ("item", "tolist", "__float__", "__int__", "__bool__")


class HostSync(AssertionError):
    pass


def _forbid(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in HOST_READS:

        def refuse(self, *args, _name=name, **kwargs):
            raise HostSync(f"Tensor.{_name} in the training step")

        monkeypatch.setattr(torch.Tensor, name, refuse)


@pytest.mark.slow  # builds a DiT and runs 4 steps: ~1 min on a loaded 2-core CPU
def test_latent_fm_step_has_no_host_reads_after_the_first_batch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cfg = compose_config("train", OVERRIDES)
    torch.manual_seed(0)
    model = instantiate(cfg.model)
    optimizer = model.configure_optimizers()
    optimizer = optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer
    images = torch.rand(4, 3, 16, 16)
    labels = torch.arange(4) % max(model.num_classes, 1)
    assert model.ema is not None

    def model_part() -> None:  # what latentzoo runs per step besides torch's optimizer
        loss = model.step((images, labels), "train")["loss"]
        optimizer.zero_grad()
        loss.backward()

    model_part()  # the first batch checks the latent scale once (a logged float)
    optimizer.step()
    for _ in range(3):
        with monkeypatch.context() as patch:
            _forbid(patch)
            model_part()
        # torch's CPU Adam reads its step counter with .item(): a CPU tensor, no GPU sync (on
        # CUDA the fused Adam keeps it on the device), so it runs outside the detector
        optimizer.step()
        with monkeypatch.context() as patch:
            _forbid(patch)
            model.ema.update(model.net)
    # the detector works: a host read in the step is caught
    with monkeypatch.context() as patch:
        _forbid(patch)
        with pytest.raises(HostSync):
            float(model.step((images, labels), "train")["loss"])
