"""Classification metrics of class-conditional generative models (spec nfpi.md §8).

- :class:`FlowClassification` (``metrics=classification``): accuracy of the model's own
  generative classifier (``class_scores``: argmax_c log p(x|c)) on the test split, top-1 and
  top-5, over ``num_test_repeats`` dequantisation seeds (mean ± std).
- :class:`SampleClassifier` (``metrics=sample_classifier``): train a ResNet-18 (CIFAR stem) on
  class-balanced samples at each temperature T, quantised to uint8, and report its accuracy on
  the **real** test set; ``baseline: true`` also trains it on real training images.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from latentzoo.metrics.capabilities import require_capabilities
from latentzoo.metrics.generative import _progress
from latentzoo.utils.errors import LatentzooError
from latentzoo.utils.logging import RankedLogger

log = RankedLogger(__name__)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _batches(datamodule: Any, split: str) -> Any:
    if split not in ("test", "val"):
        raise LatentzooError(f"split must be 'test' or 'val', got '{split}'")
    return getattr(datamodule, f"{split}_dataloader")()


class FlowClassification:
    """Top-1 / top-k accuracy of ``model.class_scores`` on ``split``, repeated over
    ``num_test_repeats`` seeds of the (random) dequantisation."""

    requires = ("class_scores",)

    def __init__(
        self,
        num_test_repeats: int = 1,
        top_k: int = 5,
        split: str = "test",
        max_images: int | None = None,
        seed: int = 0,
    ) -> None:
        self.num_test_repeats, self.top_k, self.split = num_test_repeats, top_k, split
        self.max_images, self.seed = max_images, seed

    @torch.no_grad()
    def __call__(self, model: Any, datamodule: Any) -> dict[str, float]:
        require_capabilities(model, self.requires, "classification")
        device, k = _device(model), None
        top1, topk = [], []
        with _progress() as progress:
            task = progress.add_task("NF classification", total=self.num_test_repeats)
            for repeat in range(self.num_test_repeats):
                torch.manual_seed(self.seed + repeat)
                right1 = rightk = seen = 0
                for x, y in _batches(datamodule, self.split):
                    if self.max_images is not None:
                        x, y = x[: self.max_images - seen], y[: self.max_images - seen]
                    if len(x) == 0:
                        break
                    scores = model.class_scores(x.to(device)).cpu()
                    k = min(self.top_k, scores.shape[1])
                    best = scores.topk(k, dim=1).indices
                    right1 += int((best[:, 0] == y).sum())
                    rightk += int((best == y[:, None]).any(1).sum())
                    seen += len(y)
                top1.append(right1 / seen)
                topk.append(rightk / seen)
                progress.update(task, advance=1)
        out = {
            "top1": float(np.mean(top1)),
            "top1_std": float(np.std(top1)),
            f"top{k}": float(np.mean(topk)),
            f"top{k}_std": float(np.std(topk)),
            "num_images": float(seen),
        }
        log.info(f"NF accuracy top-1 {out['top1']:.4f} ± {out['top1_std']:.4f} ({seen} images)")
        return out


def resnet18_cifar(num_classes: int, in_channels: int = 3) -> nn.Module:
    """torchvision ResNet-18 with the CIFAR stem: 3×3 stride-1 first conv, no max-pool."""
    from torchvision.models import resnet18

    net = resnet18(num_classes=num_classes)
    net.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
    net.maxpool = nn.Identity()
    return net


def _augment(x: torch.Tensor, pad: int, flip: bool) -> torch.Tensor:
    """RandomCrop(size, padding=pad) (zero padding) and a horizontal flip with p = 0.5."""
    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,)).tolist()
    dx = torch.randint(0, 2 * pad + 1, (n,)).tolist()
    x = torch.stack(
        [padded[i, :, a : a + h, b : b + w] for i, (a, b) in enumerate(zip(dy, dx, strict=True))]
    )
    if flip:
        mask = torch.rand(n, device=x.device) < 0.5
        x = torch.where(mask[:, None, None, None], x.flip(-1), x)
    return x


def train_classifier(
    images: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    epochs: int,
    batch_size: int = 100,
    max_lr: float = 0.1,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    flip: bool = True,
    device: torch.device | str = "cpu",
    description: str = "classifier",
) -> nn.Module:
    """SGD + OneCycleLR (stepped per batch) on uint8 ``images`` (N, C, H, W)."""
    net = resnet18_cifar(num_classes, images.shape[1]).to(device)
    opt = torch.optim.SGD(net.parameters(), lr=max_lr, momentum=momentum, weight_decay=weight_decay)
    steps = max(1, len(images) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=max_lr, epochs=epochs, steps_per_epoch=steps
    )
    net.train()
    with _progress() as progress:
        task = progress.add_task(description, total=epochs * steps)
        for _ in range(epochs):
            order = torch.randperm(len(images))
            for i in range(steps):
                idx = order[i * batch_size : (i + 1) * batch_size]
                x = images[idx].to(device).float() / 255
                x = (_augment(x, 4, flip) - 0.5) / 0.5
                loss = F.cross_entropy(net(x), labels[idx].to(device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                progress.update(task, advance=1)
    return net.eval()


@torch.no_grad()
def test_accuracy(net: nn.Module, datamodule: Any, device: Any, max_images: int | None) -> float:
    right = seen = 0
    for x, y in _batches(datamodule, "test"):
        if max_images is not None:
            x, y = x[: max_images - seen], y[: max_images - seen]
        if len(x) == 0:
            break
        x = (torch.round(x * 255) / 255 - 0.5) / 0.5
        right += int((net(x.to(device)).argmax(1).cpu() == y).sum())
        seen += len(y)
    return right / max(seen, 1)


class SampleClassifier:
    """CNN trained on model samples, tested on real data, per temperature (spec §8).

    Args:
        temperature: one T or a list (the original: 1.2 ... 0.7).
        train_size: total samples per T (train_size // k per class).
        epochs: CIFAR-10 30, CIFAR-100 50, MNIST 3.
        baseline: also train on ``train_size`` real training images (reported as ``real``).
        max_test_images: cap the real test set (tests/smoke runs).
    """

    requires = ("sample",)

    def __init__(
        self,
        temperature: float | Sequence[float] = (1.2, 1.1, 1.0, 0.9, 0.8, 0.7),
        train_size: int = 50_000,
        epochs: int = 30,
        batch_size: int = 100,
        max_lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        flip: bool = True,
        baseline: bool = False,
        sample_batch_size: int = 500,
        max_test_images: int | None = None,
        seed: int = 0,
    ) -> None:
        temps = [temperature] if isinstance(temperature, int | float) else list(temperature)
        self.temperatures = [float(t) for t in temps]
        self.train_size, self.epochs, self.batch_size = train_size, epochs, batch_size
        self.opt = {"max_lr": max_lr, "momentum": momentum, "weight_decay": weight_decay}
        self.flip, self.baseline = flip, baseline
        self.sample_batch_size, self.max_test_images, self.seed = (
            sample_batch_size,
            max_test_images,
            seed,
        )

    @torch.no_grad()
    def samples(
        self, model: Any, temperature: float, num_classes: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """train_size // k samples per class at ``temperature`` as uint8 (on the CPU)."""
        per_class = self.train_size // num_classes
        if per_class < 1:
            raise LatentzooError(f"train_size={self.train_size} < {num_classes} classes")
        labels = torch.arange(num_classes).repeat_interleave(per_class)
        device = _device(model)
        images = []
        with _progress() as progress:
            task = progress.add_task(f"sampling T={temperature}", total=len(labels))
            for start in range(0, len(labels), self.sample_batch_size):
                y = labels[start : start + self.sample_batch_size]
                x = model.sample(len(y), labels=y.to(device), temperature=temperature)
                images.append((x.clamp(0, 1) * 255).round().to(torch.uint8).cpu())
                progress.update(task, advance=len(y))
        return torch.cat(images), labels

    def __call__(self, model: Any, datamodule: Any) -> dict[str, float]:
        require_capabilities(model, self.requires, "sample_classifier")
        num_classes = int(getattr(model, "num_classes", 0) or datamodule.num_classes)
        device = _device(model)
        was_training = model.training
        model.eval()
        out: dict[str, float] = {}
        try:
            with torch.random.fork_rng(
                devices=[device.index or 0] if device.type == "cuda" else []
            ):
                torch.manual_seed(self.seed)
                runs = [(f"T{t:g}", t) for t in self.temperatures]
                if self.baseline:
                    runs.append(("real", None))
                for name, temp in runs:
                    began = time.perf_counter()
                    if temp is None:
                        images, labels = self._real(datamodule)
                    else:
                        images, labels = self.samples(model, temp, num_classes)
                    with torch.enable_grad():
                        net = train_classifier(
                            images,
                            labels,
                            num_classes,
                            self.epochs,
                            self.batch_size,
                            flip=self.flip,
                            device=device,
                            description=f"ResNet-18 on {name}",
                            **self.opt,
                        )
                    acc = test_accuracy(net, datamodule, device, self.max_test_images)
                    out[f"accuracy/{name}"] = acc
                    log.info(
                        f"sample classifier {name}: real test accuracy {acc:.4f} "
                        f"({len(images)} training images, {time.perf_counter() - began:.0f} s)"
                    )
        finally:
            model.train(was_training)
        return out

    def _real(self, datamodule: Any) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels, seen = [], [], 0
        for x, y in datamodule.reference_dataloader("train", batch_size=500):
            images.append((x * 255).round().to(torch.uint8))
            labels.append(y)
            seen += len(y)
            if seen >= self.train_size:
                break
        return torch.cat(images)[: self.train_size], torch.cat(labels)[: self.train_size]
