from latentzoo.models.base import LatentModel
from latentzoo.models.beta_vae import BetaVAE

__all__ = ["BetaVAE", "LatentModel"]
