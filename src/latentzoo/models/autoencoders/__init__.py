"""Frozen first stages for latent generative models (common interface in ``base.FirstStage``)."""

from latentzoo.models.autoencoders.base import FirstStage
from latentzoo.models.autoencoders.diffusers_vae import DiffusersVAE
from latentzoo.models.autoencoders.identity import IdentityFirstStage
from latentzoo.models.autoencoders.kl import KLAutoencoderNet, KLFirstStage

__all__ = ["DiffusersVAE", "FirstStage", "IdentityFirstStage", "KLAutoencoderNet", "KLFirstStage"]
