from latentzoo.models.base import LatentModel
from latentzoo.models.beta_vae import BetaVAE

__all__ = ["BetaVAE", "LatentModel"]
from latentzoo.models.kl_autoencoder import KLAutoencoder  # noqa: E402
from latentzoo.models.latent_fm import LatentFlowMatching  # noqa: E402

__all__ += ["KLAutoencoder", "LatentFlowMatching"]
