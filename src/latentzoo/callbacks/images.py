"""Reconstruction grids, latent-traversal grids and traversal GIFs, written to the run dir and to
the image-capable loggers (TensorBoard, Weights & Biases).

Model-agnostic: a model qualifies if it has ``encode(x) -> [B, D]`` (a deterministic code) and
``decode(z) -> images in [0, 1]``; otherwise the callback disables itself with a warning.
Data-agnostic: the images come from any batch kind the datamodules yield (:func:`batch_images`);
batches without images (a latent cache) disable the data-driven grids with one warning.
A stop signal (SIGINT/SIGTERM, see :mod:`latentzoo.callbacks.interrupt`) aborts a grid at its
next net evaluation; the grid is then skipped with one log line.
"""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from PIL import Image
from torchvision.utils import make_grid, save_image

from latentzoo.callbacks.interrupt import SamplingInterrupted, abort_on_stop, stop_requested
from latentzoo.callbacks.randomness import rank_seed
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


def log_gif(trainer: L.Trainer, tag: str, path: Path, step: int) -> None:
    """Send an animated GIF file to the loggers that show one; a failure only warns.

    TensorBoard shows a GIF-encoded image summary as an animation (what ``add_video`` writes,
    minus its moviepy dependency); W&B takes the file as a ``wandb.Video``.
    """
    for logger in trainer.loggers:
        try:
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_image") and hasattr(experiment, "_get_file_writer"):
                from tensorboard.compat.proto.summary_pb2 import Summary

                with Image.open(path) as gif:
                    width, height = gif.size
                image = Summary.Image(
                    height=height, width=width, colorspace=3, encoded_image_string=path.read_bytes()
                )
                summary = Summary(value=[Summary.Value(tag=tag, image=image)])
                experiment._get_file_writer().add_summary(summary, step)
            elif hasattr(logger, "log_video"):  # Weights & Biases
                logger.log_video(key=tag, videos=[str(path)], step=step)
        except Exception as error:  # a logger hiccup must not stop training
            log.warning(f"Could not send {path.name} to {type(logger).__name__}: {error}")


def to_uint8(grid: torch.Tensor) -> np.ndarray:
    """[C, H, W] in [0, 1] -> [H, W, 3] uint8."""
    grid = grid.detach().float().clamp(0, 1).cpu()
    if grid.shape[0] == 1:
        grid = grid.expand(3, -1, -1)
    return (grid[:3] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


def save_gif(frames: Sequence[np.ndarray], path: Path, fps: float) -> None:
    """Write [H, W, 3] uint8 frames as a looping GIF. All frames share one palette and one
    colour-to-index map, so equal pixels stay equal from frame to frame; up to 256 colours
    (e.g. grayscale) are stored exactly, more are median-cut to 256."""
    height = frames[0].shape[0]
    stack = np.concatenate(list(frames), axis=0)  # [T * H, W, 3]
    colors, inverse = np.unique(stack.reshape(-1, 3), axis=0, return_inverse=True)
    if len(colors) <= 256:
        indices = inverse.reshape(stack.shape[:2]).astype(np.uint8)
        palette = colors.flatten().tolist()
    else:
        quantized = Image.fromarray(stack).quantize(256, Image.Quantize.MEDIANCUT)
        indices, palette = np.asarray(quantized), quantized.getpalette()
    images = []
    for start in range(0, len(stack), height):
        image = Image.fromarray(indices[start : start + height], mode="P")
        image.putpalette(palette)
        images.append(image)
    path.parent.mkdir(parents=True, exist_ok=True)
    images[0].save(
        path,
        save_all=True,
        append_images=images[1:],
        duration=max(int(round(1000 / fps)), 20),
        loop=0,
        optimize=False,
    )


def traversal_values(
    codes: torch.Tensor, num_steps: int, limit: float, quantile: float | None
) -> torch.Tensor:
    """[D, num_steps] values each latent is swept over: ``[-limit, limit]`` (the prior's bulk),
    or, with ``quantile=q``, from the q- to the (1-q)-quantile of the posterior means in
    ``codes`` [B, D] (useful when the code is not standard-normal, e.g. a collapsed or scaled
    latent)."""
    steps = torch.linspace(0, 1, num_steps, device=codes.device)
    if quantile is None:
        low = torch.full((codes.shape[1],), -limit, device=codes.device)
        high = -low
    else:
        bounds = torch.tensor([quantile, 1 - quantile], device=codes.device)
        low, high = torch.quantile(codes.float(), bounds, dim=0)
    return low[:, None] + (high - low)[:, None] * steps  # [D, num_steps]


IMAGE_KEYS = ("image", "images", "frames")  # dict batches: images, or sequences (their frames)


def batch_images(batch: Any) -> torch.Tensor | None:
    """The ``[B, C, H, W]`` images of a loader batch of any kind the datamodules yield: an image
    tensor, an ``(images, labels, ...)`` tuple or list, a dict with an ``image``/``images`` key,
    or a sequence batch (a ``{"frames": [B, S+1, C, H, W], ...}`` dict or a tuple whose first
    item is such frames), of which the first frames are taken. ``None`` when the batch holds no
    images, e.g. a latent cache's ``{"latent", "label"}``."""
    if isinstance(batch, dict):
        key = next((k for k in IMAGE_KEYS if k in batch), None)
        batch = batch[key] if key is not None else None
    elif isinstance(batch, list | tuple) and batch:
        batch = batch[0]
    if not isinstance(batch, torch.Tensor):
        return None
    if batch.dim() == 5:  # sequences (B, S+1, C, H, W): their first frames
        return batch[:, 0]
    return batch if batch.dim() == 4 else None


def describe_batch(batch: Any) -> str:
    """A short description of a batch's structure for a warning, e.g. ``dict{latent, label}``."""
    if isinstance(batch, dict):
        return f"dict{{{', '.join(map(str, batch))}}}"
    if isinstance(batch, list | tuple):
        return f"{type(batch).__name__}({', '.join(describe_batch(item) for item in batch)})"
    if isinstance(batch, torch.Tensor):
        return f"tensor{list(batch.shape)}"
    return type(batch).__name__


class UnsupportedModel(Exception):
    """The model has the capabilities by name but not in the shape a callback needs."""


class UnsupportedData(Exception):
    """The data's batches lack what a callback needs (e.g. images in a latent cache)."""


class _GridCallback(L.Callback):
    """Every ``every_n_steps`` training steps and at the end of training, draw a grid from a
    fixed validation batch and save it as ``<dirpath>/<name>_step<N>.png``."""

    name = "grid"
    required = ("encode", "decode")
    # False: rank 0 draws alone (cheap grids); True: every rank draws its share in ``draw``
    # (which gathers them), so an expensive grid does not stall the other ranks under DDP
    sharded = False

    def __init__(self, dirpath: str, every_n_steps: int = 500, num_images: int = 8) -> None:
        self.dirpath = Path(dirpath)
        self.every_n_steps = every_n_steps
        self.num_images = num_images
        self._images: torch.Tensor | None = None
        self._enabled = True
        self._last_step = -1

    @property
    def images_needed(self) -> int | None:
        """How many images of the first validation batch to keep (None: all of them)."""
        return self.num_images

    def draw(self, model: L.LightningModule, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def extra(
        self, trainer: L.Trainer, model: L.LightningModule, images: torch.Tensor, step: int
    ) -> None:
        """Further outputs after the PNG (called under ``no_grad`` in eval mode)."""

    def _fixed_images(self, trainer: L.Trainer) -> torch.Tensor:
        if self._images is None:
            loaders = trainer.val_dataloaders or trainer.datamodule.val_dataloader()
            loader = loaders[0] if isinstance(loaders, list | tuple) else loaders
            batch = next(iter(loader))
            images = batch_images(batch)
            if images is None:
                raise UnsupportedData(
                    f"the validation batches ({describe_batch(batch)}) hold no images"
                )
            self._images = images[: self.images_needed].cpu()
        return self._images

    def _write(self, trainer: L.Trainer, model: L.LightningModule) -> None:
        if not (self.sharded or trainer.is_global_zero):
            return
        step = trainer.global_step
        if not self._enabled or step == self._last_step:  # train end right after a periodic one
            return
        if stop_requested(trainer):  # stopping on a signal: no new grid
            return
        missing = self.missing(model)
        if missing:
            log.warning(f"{type(self).__name__} disabled: the model has no {', '.join(missing)}")
            self._enabled = False
            return
        self._last_step = step
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), abort_on_stop(trainer):
                images = self._fixed_images(trainer).to(model.device)
                start = time.perf_counter()
                grid = self.draw(model, images).float().cpu()
                if self.sharded:
                    log.info(
                        f"{self.name} grid at step {step}: {time.perf_counter() - start:.2f} s "
                        f"on each of {trainer.world_size} rank(s)"
                    )
                if trainer.is_global_zero:
                    self.dirpath.mkdir(parents=True, exist_ok=True)
                    save_image(grid, self.dirpath / f"{self.name}_step{step:06d}.png")
                    log_image(trainer, f"images/{self.name}", grid, step)
                    self.extra(trainer, model, images, step)
        except (UnsupportedModel, UnsupportedData) as reason:
            log.warning(f"{type(self).__name__} disabled: {reason}")
            self._enabled = False
        except SamplingInterrupted:
            log.warning(f"{self.name} grid at step {step} skipped: stopping on a signal")
        finally:
            model.train(was_training)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps > 0 and step > 0 and step % self.every_n_steps == 0:
            self._write(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self._write(trainer, pl_module)

    def missing(self, model: L.LightningModule) -> list[str]:
        """The capabilities this grid needs that ``model`` lacks."""
        return [name for name in self.required if not hasattr(model, name)]


class ReconstructionGrid(_GridCallback):
    """Top row: validation images; bottom row: their reconstructions (``model.reconstruct``, else
    decode of encode)."""

    name = "reconstructions"

    def missing(self, model: L.LightningModule) -> list[str]:
        return [] if hasattr(model, "reconstruct") else super().missing(model)

    def draw(self, model: L.LightningModule, images: torch.Tensor) -> torch.Tensor:
        reconstruct = getattr(model, "reconstruct", None)
        reconstructions = reconstruct(images) if reconstruct else model.decode(model.encode(images))
        return make_grid(torch.cat([images, reconstructions]), nrow=len(images), pad_value=0.5)


class SampleGrid(_GridCallback):
    """Images from ``model.sample(n)`` (in [0, 1]) drawn with a fixed seed, so grids at
    different steps start from the same noise and show how the samples evolve.

    Sized to the device: on the CPU ``on_cpu`` caps ``num_images`` and replaces ``sampler`` and
    ``steps`` (by default at most 16 images and 16 Euler steps instead of the model's adaptive
    solver), so a CPU run's end-of-training grid costs seconds to minutes, not hours
    (``on_cpu=None``: the same settings on every device).
    ``sampler``/``steps`` reach only models whose ``sample`` takes them (flow models); the others
    (VAEs: one decoder pass) ignore them.

    Under DDP each of the W ranks samples ⌈n / W⌉ images from seed (seed, rank) and rank 0
    gathers them: sampling (e.g. an adaptive ODE solve) is split instead of stalling W − 1
    ranks. The grid's noise therefore depends on the world size, not on the step."""

    name = "samples"
    required = ("sample",)
    sharded = True
    SETTINGS = ("num_images", "sampler", "steps")

    def __init__(
        self,
        dirpath: str,
        every_n_steps: int = 500,
        num_images: int = 64,
        seed: int = 0,
        sampler: str | None = None,
        steps: int | None = None,
        on_cpu: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(dirpath, every_n_steps, num_images)
        self.seed = seed
        self.sampler = sampler
        self.steps = steps
        self.on_cpu = dict(on_cpu or {})
        unknown = sorted(set(self.on_cpu) - set(self.SETTINGS))
        if unknown:
            raise ValueError(f"SampleGrid on_cpu takes {', '.join(self.SETTINGS)}, not {unknown}")
        self._announced: set[str] = set()

    def settings(self, device: torch.device) -> dict[str, Any]:
        """``num_images``, ``sampler`` and ``steps`` for a model on ``device``."""
        settings = {name: getattr(self, name) for name in self.SETTINGS}
        if device.type == "cpu":
            cap = self.on_cpu.get("num_images")
            settings.update(self.on_cpu)
            settings["num_images"] = min(self.num_images, cap) if cap else self.num_images
        return settings

    def _fixed_images(self, trainer: L.Trainer) -> torch.Tensor:
        return torch.empty(0)  # samples need no data

    def draw(self, model: L.LightningModule, images: torch.Tensor) -> torch.Tensor:
        settings = self.settings(model.device)
        num_images = int(settings["num_images"])
        accepted = inspect.signature(model.sample).parameters
        options = {
            key: settings[key]
            for key in ("sampler", "steps")
            if settings[key] is not None and key in accepted
        }
        if model.device.type not in self._announced:
            self._announced.add(model.device.type)
            solver = ", ".join(f"{k}={v}" for k, v in options.items()) or "the model's sampler"
            log.info(f"sample grid on {model.device.type}: {num_images} images, {solver}")
        trainer = model._trainer
        world, rank = (trainer.world_size, trainer.global_rank) if trainer else (1, 0)
        cuda = [model.device.index or 0] if model.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):  # leave the training RNG untouched
            torch.manual_seed(self.seed if world == 1 else rank_seed(self.seed, rank))
            samples = model.sample(math.ceil(num_images / world), **options)
        if world > 1:
            samples = model.all_gather(samples).flatten(0, 1)[:num_images]
        rows = max(1, round(num_images**0.5))
        return make_grid(samples.float().clamp(0, 1), nrow=rows, pad_value=0.5)


class LatentTraversalGrid(_GridCallback):
    """Latent traversals: each latent dimension swept while the others stay at the posterior
    mean of a validation image.

    Writes ``<dirpath>/traversals_step<N>.png`` (one row per dimension, one column per value,
    for image ``image_index``) and, with ``gif=True``,
    ``<dirpath>/traversals_step<N>/dim<d>.gif``: one animation per dimension whose frames are
    the ``num_steps`` values, each frame showing ``num_images`` validation images side by side
    with a bar below marking the position in the sweep.

    Args:
        every_n_steps: draw every this many training steps (0: only at the end of training).
        num_steps: values per sweep (PNG columns, GIF frames).
        limit: sweep ``[-limit, limit]`` (ignored when ``quantile`` is set).
        quantile: sweep each dimension from this to ``1 - quantile`` quantile of the posterior
            means of the first validation batch, e.g. 0.05.
        num_images: validation images per GIF frame.
        max_dims: traverse only the first this many dimensions (None: all).
        fps: GIF frames per second.
        gif: write the GIFs (the PNG is always written).
        image_index: which validation image the PNG traverses.
    """

    name = "traversals"

    def __init__(
        self,
        dirpath: str,
        every_n_steps: int = 500,
        num_steps: int = 10,
        limit: float = 2.5,
        quantile: float | None = None,
        num_images: int = 4,
        max_dims: int | None = None,
        fps: float = 5.0,
        gif: bool = True,
        image_index: int = 0,
    ) -> None:
        if quantile is not None and not 0 <= quantile < 0.5:
            raise ValueError(f"quantile must be in [0, 0.5), got {quantile}")
        if num_steps < 2:
            raise ValueError(f"num_steps must be at least 2, got {num_steps}")
        super().__init__(dirpath, every_n_steps, num_images=max(num_images, image_index + 1))
        self.num_steps = num_steps
        self.limit = limit
        self.quantile = quantile
        self.gif_images = num_images
        self.max_dims = max_dims
        self.fps = fps
        self.gif = gif
        self.image_index = image_index

    @property
    def images_needed(self) -> int | None:
        return None if self.quantile is not None else self.num_images  # quantiles: whole batch

    def _codes_and_values(
        self, model: L.LightningModule, images: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Codes of ``images`` [B, D'] and sweep values [D', steps], D' = dims traversed."""
        codes = model.encode(images)
        if codes.ndim != 2:
            raise UnsupportedModel(f"encode gives shape {tuple(codes.shape)}, not [batch, dims]")
        dims = codes.shape[1] if self.max_dims is None else min(self.max_dims, codes.shape[1])
        values = traversal_values(codes, self.num_steps, self.limit, self.quantile)[:dims]
        return codes, values

    def draw(self, model: L.LightningModule, images: torch.Tensor) -> torch.Tensor:
        codes, values = self._codes_and_values(model, images)
        dims = values.shape[0]
        code = codes[self.image_index]  # [D]
        swept = code.repeat(dims, self.num_steps, 1)  # [dims, steps, D]
        swept[torch.arange(dims), :, torch.arange(dims)] = values
        decoded = model.decode(swept.flatten(0, 1))
        return make_grid(decoded.clamp(0, 1), nrow=self.num_steps, pad_value=0.5)

    def frames(self, model: L.LightningModule, images: torch.Tensor, dim: int) -> list[np.ndarray]:
        """GIF frames for latent ``dim`` of ``images``: [H, W, 3] uint8, one per sweep value."""
        return self._frames(model, *self._codes_and_values(model, images), dim)

    def _frames(
        self, model: L.LightningModule, codes: torch.Tensor, values: torch.Tensor, dim: int
    ) -> list[np.ndarray]:
        codes = codes[: self.gif_images]
        swept = codes.repeat(self.num_steps, 1, 1)  # [steps, N, D]
        swept[:, :, dim] = values[dim][:, None]
        decoded = model.decode(swept.flatten(0, 1)).clamp(0, 1)
        decoded = decoded.unflatten(0, (self.num_steps, len(codes)))
        frames = []
        for index, row in enumerate(decoded):
            frame = to_uint8(make_grid(row, nrow=len(row), pad_value=0.5))
            height, width = frame.shape[:2]
            # the position in the sweep; also keeps Pillow from merging equal frames
            bar = np.full((max(3, height // 20), width, 3), 64, dtype=np.uint8)
            bar[:, : round(width * (index + 1) / self.num_steps)] = 255
            frames.append(np.concatenate([frame, bar], axis=0))
        return frames

    def extra(
        self, trainer: L.Trainer, model: L.LightningModule, images: torch.Tensor, step: int
    ) -> None:
        if not self.gif:
            return
        folder = self.dirpath / f"{self.name}_step{step:06d}"
        codes, values = self._codes_and_values(model, images)
        for dim in range(values.shape[0]):
            path = folder / f"dim{dim:02d}.gif"
            save_gif(self._frames(model, codes, values, dim), path, self.fps)
            log_gif(trainer, f"images/{self.name}_dim{dim:02d}", path, step)
