"""ReconstructionMetrics: MSE / PSNR of reconstruct() on the test split."""

from __future__ import annotations

import math

import pytest
import torch

from latentzoo.data.multishapes import ProcMultiShapesDataModule
from latentzoo.metrics.reconstruction import ReconstructionMetrics


class Scaled(torch.nn.Module):
    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor


def test_reconstruction_metrics_values() -> None:
    dm = ProcMultiShapesDataModule(num_train=4, num_val=4, num_test=12, batch_size=5)
    assert ReconstructionMetrics()(model=Scaled(1.0), datamodule=dm)["mse"] == 0.0
    out = ReconstructionMetrics()(model=Scaled(0.0), datamodule=dm)  # black reconstructions
    x = torch.cat([b[0] for b in dm.test_dataloader()])
    per_image = x.pow(2).flatten(1).mean(1)
    assert out["num_images"] == 12
    assert out["mse"] == pytest.approx(float(per_image.mean()), rel=1e-5)
    assert out["psnr"] == pytest.approx(float((-10 * per_image.log10()).mean()), rel=1e-5)
    assert math.isfinite(out["sum_sq_error"])
    assert ReconstructionMetrics(max_images=5)(model=Scaled(0.0), datamodule=dm)["num_images"] == 5
