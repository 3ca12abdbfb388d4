"""Decoded latent-flow paths next to the true transformed sequences, per transformation k.

Every ``every_n_steps`` training steps and at the end of training, for each k: a PNG grid (row
pairs: true x_0..x_S, then Dec(z_0..z_S) along the flow of k from μ(x_0)) and an animated GIF
whose frame t shows the true x_t (top row) over the decoded frame (bottom row). Files go to
``<dirpath>/flow_k<k>_step<N>.{png,gif}``; the PNG also goes to image-capable loggers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only
from PIL import Image
from torchvision.utils import make_grid, save_image

from latentzoo.callbacks.images import describe_batch, log_image
from latentzoo.callbacks.interrupt import SamplingInterrupted, abort_on_stop, stop_requested
from latentzoo.metrics.equivariance import unpack_sequences
from latentzoo.utils.logging import RankedLogger

log = RankedLogger(__name__)


def to_pil(grid: torch.Tensor) -> Image.Image:
    """A [C, H, W] tensor in [0, 1] as an RGB PIL image."""
    array = grid.clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array).convert("RGB")


def save_gif(frames: list[torch.Tensor], path: Path, duration_ms: int = 250) -> None:
    """Save [C, H, W] frames in [0, 1] as a looping animated GIF."""
    images = [to_pil(frame) for frame in frames]
    images[0].save(
        path, save_all=True, append_images=images[1:], duration=duration_ms, loop=0, disposal=2
    )


class NotSequences(Exception):
    """The data yields no sequence batches ``{"frames", "k"}``."""


def collect_examples(loader: Any, num_k: int, per_k: int, max_batches: int = 100) -> dict:
    """The first ``per_k`` sequences of each transformation found in ``loader``: {k: frames}."""
    found: dict[int, list[torch.Tensor]] = {}
    for i, batch in enumerate(loader):
        if not (isinstance(batch, dict) and "frames" in batch or hasattr(batch, "frames")):
            kind = describe_batch(batch)
            raise NotSequences(f"the validation batches ({kind}) hold no sequences")
        frames, k = unpack_sequences(batch)
        for kk in k.unique().tolist():
            have = sum(len(f) for f in found.get(kk, []))
            if have < per_k:
                found.setdefault(kk, []).append(frames[k == kk][: per_k - have].float())
        full = all(sum(len(f) for f in found.get(kk, [])) >= per_k for kk in range(num_k))
        if full or i + 1 >= max_batches:
            break
    return {kk: torch.cat(parts) for kk, parts in sorted(found.items())}


class FlowPaths(L.Callback):
    """PNG grids and GIFs of decoded flow paths per k (see the module docstring)."""

    def __init__(
        self,
        dirpath: str,
        every_n_steps: int = 1000,
        num_images: int = 6,
        duration_ms: int = 250,
        max_batches: int = 100,
    ) -> None:
        self.dirpath = Path(dirpath)
        self.every_n_steps = every_n_steps
        self.num_images = num_images
        self.duration_ms = duration_ms
        self.max_batches = max_batches
        self._examples: dict[int, torch.Tensor] | None = None
        self._enabled = True

    def _fixed_examples(self, trainer: L.Trainer, model: L.LightningModule) -> dict:
        if self._examples is None:
            loaders = trainer.val_dataloaders or trainer.datamodule.val_dataloader()
            loader = loaders[0] if isinstance(loaders, list | tuple) else loaders
            self._examples = collect_examples(
                loader, int(model.num_transforms), self.num_images, self.max_batches
            )
        return self._examples

    def draw(self, model: Any, frames: torch.Tensor, k: int) -> tuple[torch.Tensor, list]:
        """Grid [C, H', W'] and GIF frames for sequences ``frames`` (n, S+1, C, H, W) under k."""
        steps = frames.shape[1] - 1
        if getattr(model, "variant", "supervised") == "weak":
            flow_k = model.predict_transform(frames)  # R's own index, as at evaluation
        else:
            flow_k = torch.full((len(frames),), k, dtype=torch.long, device=frames.device)
        decoded = model.transform(frames[:, 0], flow_k, steps).transpose(0, 1)  # (n, S+1, ...)
        rows = torch.stack([frames, decoded], dim=1).flatten(0, 2)  # true row, decoded row, ...
        grid = make_grid(rows, nrow=steps + 1, pad_value=0.5)
        gif = [
            make_grid(torch.cat([frames[:, t], decoded[:, t]]), nrow=len(frames), pad_value=0.5)
            for t in range(steps + 1)
        ]
        return grid, gif

    @rank_zero_only
    def write(self, trainer: L.Trainer, model: L.LightningModule) -> list[Path]:
        if not self._enabled or stop_requested(trainer):
            return []
        if not all(hasattr(model, name) for name in ("transform", "num_transforms")):
            log.warning("FlowPaths disabled: the model has no transform(x, k, steps)")
            self._enabled = False
            return []
        was_training = model.training
        model.eval()
        step = trainer.global_step
        self.dirpath.mkdir(parents=True, exist_ok=True)
        written = []
        try:
            with abort_on_stop(trainer):
                for k, frames in self._fixed_examples(trainer, model).items():
                    grid, gif = self.draw(model, frames.to(model.device), k)
                    png = self.dirpath / f"flow_k{k}_step{step:06d}.png"
                    save_image(grid.float().cpu(), png)
                    gif_path = png.with_suffix(".gif")
                    save_gif([f.float().cpu() for f in gif], gif_path, self.duration_ms)
                    log_image(trainer, f"flow_paths/k{k}", grid.float().cpu(), step)
                    written += [png, gif_path]
        except NotSequences as reason:
            log.warning(f"FlowPaths disabled: {reason}")
            self._enabled = False
        except SamplingInterrupted:
            log.warning(f"flow paths at step {step} skipped: stopping on a signal")
        finally:
            model.train(was_training)
        return written

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps > 0 and step > 0 and step % self.every_n_steps == 0:
            self.write(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.write(trainer, pl_module)
