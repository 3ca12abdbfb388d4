"""Reconstruction and latent-traversal grids, written to the run dir and image-capable loggers."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only
from torchvision.utils import make_grid, save_image

from latentzoo.utils.logging import RankedLogger

log = RankedLogger(__name__)


def log_image(trainer: L.Trainer, tag: str, grid: torch.Tensor, step: int) -> None:
    """Send a [C, H, W] grid in [0, 1] to every logger that takes images."""
    for logger in trainer.loggers:
        experiment = getattr(logger, "experiment", None)
        if hasattr(experiment, "add_image"):  # TensorBoard
            experiment.add_image(tag, grid, global_step=step)
        elif hasattr(logger, "log_image"):  # Weights & Biases
            logger.log_image(key=tag, images=[grid], step=step)


class _GridCallback(L.Callback):
    """Every ``every_n_steps`` training steps and at the end of training, draw a grid from a
    fixed validation batch and save it as ``<dirpath>/<name>_step<N>.png``."""

    name = "grid"
    required = ("encode", "decode")

    def __init__(self, dirpath: str, every_n_steps: int = 500, num_images: int = 8) -> None:
        self.dirpath = Path(dirpath)
        self.every_n_steps = every_n_steps
        self.num_images = num_images
        self._images: torch.Tensor | None = None
        self._enabled = True

    def draw(self, model: L.LightningModule, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _fixed_images(self, trainer: L.Trainer) -> torch.Tensor | None:
        if self._images is None:
            loaders = trainer.val_dataloaders or trainer.datamodule.val_dataloader()
            loader = loaders[0] if isinstance(loaders, list | tuple) else loaders
            batch = next(iter(loader))
            images = batch[0] if isinstance(batch, list | tuple) else batch
            self._images = images[: self.num_images]
        return self._images

    @rank_zero_only
    def _write(self, trainer: L.Trainer, model: L.LightningModule) -> None:
        if not self._enabled:
            return
        missing = [name for name in self.required if not hasattr(model, name)]
        if missing:
            log.warning(f"{type(self).__name__} disabled: the model has no {', '.join(missing)}")
            self._enabled = False
            return
        was_training = model.training
        model.eval()
        with torch.no_grad():
            grid = self.draw(model, self._fixed_images(trainer).to(model.device)).float().cpu()
        model.train(was_training)
        step = trainer.global_step
        self.dirpath.mkdir(parents=True, exist_ok=True)
        path = self.dirpath / f"{self.name}_step{step:06d}.png"
        save_image(grid, path)
        log_image(trainer, f"images/{self.name}", grid, step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps > 0 and step > 0 and step % self.every_n_steps == 0:
            self._write(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self._write(trainer, pl_module)


class ReconstructionGrid(_GridCallback):
    """Top row: validation images; bottom row: their reconstructions (decode of encode)."""

    name = "reconstructions"

    def draw(self, model: L.LightningModule, images: torch.Tensor) -> torch.Tensor:
        reconstructions = model.decode(model.encode(images))
        return make_grid(torch.cat([images, reconstructions]), nrow=len(images), pad_value=0.5)


class LatentTraversalGrid(_GridCallback):
    """One row per latent dimension: the code of one image with that dimension swept over
    ``[-limit, limit]`` (the prior's bulk) while the others stay at the posterior mean."""

    name = "traversals"

    def __init__(
        self,
        dirpath: str,
        every_n_steps: int = 500,
        num_steps: int = 10,
        limit: float = 2.5,
        image_index: int = 0,
    ) -> None:
        super().__init__(dirpath, every_n_steps, num_images=image_index + 1)
        self.num_steps = num_steps
        self.limit = limit
        self.image_index = image_index

    def draw(self, model: L.LightningModule, images: torch.Tensor) -> torch.Tensor:
        code = model.encode(images[self.image_index : self.image_index + 1])[0]  # [D]
        dims = code.shape[0]
        values = torch.linspace(-self.limit, self.limit, self.num_steps, device=code.device)
        codes = code.repeat(dims, self.num_steps, 1)  # [D, steps, D]
        codes[torch.arange(dims), :, torch.arange(dims)] = values
        decoded = model.decode(codes.flatten(0, 1))
        return make_grid(decoded, nrow=self.num_steps, pad_value=0.5)
