"""diffusers ``AutoencoderKL`` as a frozen first stage (the SD VAE of LDM / LFM).

Default weights: ``stabilityai/sd-vae-ft-mse`` with scale factor 0.18215 (Rombach et al. 2022;
LFM keeps it for every dataset). ``pretrained`` is a hub id or a local folder holding
``config.json`` and ``diffusion_pytorch_model.safetensors``. ``config`` builds a randomly
initialised AutoencoderKL instead (tests). diffusers is an optional extra, imported lazily.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from latentzoo.models.autoencoders.base import FirstStage
from latentzoo.utils.errors import LatentzooError


def _import_autoencoder_kl():
    try:
        from diffusers import AutoencoderKL
    except ImportError as error:
        raise LatentzooError(
            "model/autoencoder=sd_vae needs diffusers: pip install 'latentzoo[diffusers]' "
            "(or pick model/autoencoder=kl_f8|kl_f4|identity)"
        ) from error
    return AutoencoderKL


class DiffusersVAE(FirstStage):
    def __init__(
        self,
        pretrained: str | None = "stabilityai/sd-vae-ft-mse",
        subfolder: str | None = None,
        scale_factor: float = 0.18215,
        config: dict[str, Any] | None = None,
        local_files_only: bool | None = None,
    ) -> None:
        super().__init__()
        AutoencoderKL = _import_autoencoder_kl()
        if config is not None:
            self.vae = AutoencoderKL(**dict(config))
            self.name = "diffusers:random"
        else:
            if local_files_only is None:
                local_files_only = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "")
            try:
                self.vae = AutoencoderKL.from_pretrained(
                    pretrained, subfolder=subfolder, local_files_only=local_files_only
                )
            except Exception as error:  # hub/network/file errors come in many types
                where = Path(pretrained).expanduser()
                raise LatentzooError(
                    f"could not load the VAE '{pretrained}' ({type(error).__name__}: {error}). "
                    f"Either point model.autoencoder.pretrained to a local folder with "
                    f"config.json and diffusion_pytorch_model.safetensors (looked at {where}), or "
                    "download it once with network access (huggingface-cli download "
                    f"{pretrained}) and run with HF_HUB_OFFLINE=1 to use the hub cache."
                ) from error
            self.name = f"diffusers:{Path(str(pretrained)).name}"
            self.rebuilt_from_config = True  # checkpoints of latent models leave it out
        self.scale_factor = scale_factor
        self.latent_channels = int(self.vae.config.latent_channels)
        self.downsample = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.freeze()

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        posterior = self.vae.encode(x).latent_dist
        return posterior.mean, posterior.std

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(z).sample
