from latentzoo.models.base import LatentModel
from latentzoo.models.beta_vae import BetaVAE

__all__ = ["BetaVAE", "LatentModel"]
from latentzoo.models.latent_flow import LatentFlow  # noqa: E402

__all__ += ["LatentFlow"]
