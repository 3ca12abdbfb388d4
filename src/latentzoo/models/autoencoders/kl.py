"""latentzoo's own KL-regularised conv autoencoder (the LDM "kl-f4/kl-f8" family, small).

Rombach et al., "High-Resolution Image Synthesis with Latent Diffusion Models", CVPR 2022:
an encoder of resnet blocks with ``len(ch_mult) − 1`` stride-2 downsamplings outputs the mean
and log-variance of a diagonal Gaussian posterior; the decoder mirrors it. Trained with
``model=kl_autoencoder`` (``latentzoo.models.KLAutoencoder``); ``KLFirstStage`` loads that
checkpoint frozen for latent flow matching.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from latentzoo.models.autoencoders.base import FirstStage

log = logging.getLogger(__name__)


def _norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(32, c) if c % min(32, c) == 0 else 1, c)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            _norm(cin),
            nn.SiLU(),
            nn.Conv2d(cin, cout, 3, padding=1),
            _norm(cout),
            nn.SiLU(),
            nn.Conv2d(cout, cout, 3, padding=1),
        )
        self.skip = nn.Identity() if cin == cout else nn.Conv2d(cin, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + self.body(x)


class KLAutoencoderNet(nn.Module):
    """Conv encoder/decoder; ``downsample = 2^(len(ch_mult) − 1)``."""

    def __init__(
        self,
        in_channels: int = 3,
        z_channels: int = 4,
        ch: int = 32,
        ch_mult: tuple[int, ...] | list[int] = (1, 2, 2, 4),
        num_res_blocks: int = 1,
    ) -> None:
        super().__init__()
        self.in_channels, self.z_channels = in_channels, z_channels
        self.downsample = 2 ** (len(ch_mult) - 1)
        widths = [ch * m for m in ch_mult]
        enc: list[nn.Module] = [nn.Conv2d(in_channels, widths[0], 3, padding=1)]
        c = widths[0]
        for i, w in enumerate(widths):
            for _ in range(num_res_blocks):
                enc.append(ResnetBlock(c, w))
                c = w
            if i < len(widths) - 1:
                enc.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
        enc += [ResnetBlock(c, c), _norm(c), nn.SiLU(), nn.Conv2d(c, 2 * z_channels, 3, padding=1)]
        self.encoder = nn.Sequential(*enc)
        dec: list[nn.Module] = [nn.Conv2d(z_channels, c, 3, padding=1), ResnetBlock(c, c)]
        for i, w in reversed(list(enumerate(widths))):
            for _ in range(num_res_blocks):
                dec.append(ResnetBlock(c, w))
                c = w
            if i > 0:
                dec += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c, c, 3, padding=1)]
        dec += [_norm(c), nn.SiLU(), nn.Conv2d(c, in_channels, 3, padding=1)]
        self.decoder = nn.Sequential(*dec)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x in [-1, 1] -> posterior (mean, std)."""
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        return mean, torch.exp(0.5 * logvar.clamp(-30.0, 20.0))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mean, std = self.encode(x)
        z = mean + std * torch.randn_like(std)
        return self.decode(z), mean, std


class KLFirstStage(FirstStage):
    """Frozen ``KLAutoencoderNet`` from a ``model=kl_autoencoder`` checkpoint.

    The architecture is rebuilt from the checkpoint's saved config (``model.net``), so only the
    path is needed. Without ``ckpt_path`` the given ``net`` is used with random weights (tests,
    smoke runs), with a warning.
    """

    def __init__(
        self,
        ckpt_path: str | None = None,
        net: KLAutoencoderNet | None = None,
        scale_factor: float = 1.0,
        name: str = "kl",
    ) -> None:
        super().__init__()
        if ckpt_path:
            net = load_kl_net(ckpt_path)
            self.name = f"{name}:{ckpt_path}"
            self.rebuilt_from_config = True  # checkpoints of latent models leave it out
        elif net is None:
            raise ValueError("KLFirstStage needs ckpt_path (a kl_autoencoder checkpoint) or net")
        else:
            log.warning(f"{name} first stage has random weights (no ckpt_path): smoke runs only")
            self.name = f"{name}:random"
        self.net = net
        self.scale_factor = scale_factor
        self.latent_channels = net.z_channels
        self.downsample = net.downsample
        self.freeze()

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.net.encode(x)

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.net.decode(z)


def load_kl_net(ckpt_path: str) -> KLAutoencoderNet:
    """Rebuild and load the net of a ``model=kl_autoencoder`` Lightning checkpoint."""
    import hydra

    from latentzoo.utils.checkpoint import checkpoint_config, load_checkpoint
    from latentzoo.utils.errors import CheckpointError

    checkpoint = load_checkpoint(ckpt_path)
    cfg = checkpoint_config(checkpoint, ckpt_path)
    if not str(cfg.model.get("_target_", "")).endswith("KLAutoencoder"):
        raise CheckpointError(
            f"'{ckpt_path}' holds {cfg.model.get('_target_')}, not a KLAutoencoder"
        )
    net = hydra.utils.instantiate(cfg.model.net)
    state = {k[4:]: v for k, v in checkpoint["state_dict"].items() if k.startswith("net.")}
    net.load_state_dict(state)
    return net


def kl_loss(mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, std²) || N(0, I)) summed over latent elements, one value per sample."""
    var = std.pow(2)
    return 0.5 * (mean.pow(2) + var - torch.log(var.clamp_min(1e-20)) - 1).flatten(1).sum(1)


def l1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.l1_loss(a, b, reduction="none").flatten(1).sum(1)
