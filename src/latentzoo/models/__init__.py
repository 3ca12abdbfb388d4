from latentzoo.models.base import LatentModel
from latentzoo.models.beta_tcvae import BetaTCVAE
from latentzoo.models.beta_vae import BetaVAE
from latentzoo.models.dlp import DeepLatentParticles
from latentzoo.models.factor_vae import FactorVAE
from latentzoo.models.kl_autoencoder import KLAutoencoder
from latentzoo.models.latent_flow import LatentFlow
from latentzoo.models.latent_fm import LatentFlowMatching
from latentzoo.models.lie_vae import LieVAE
from latentzoo.models.nfpi import NFPI
from latentzoo.models.soft_intro_vae import SoftIntroVAE

__all__ = [
    "BetaTCVAE",
    "BetaVAE",
    "DeepLatentParticles",
    "FactorVAE",
    "KLAutoencoder",
    "LatentFlow",
    "LatentFlowMatching",
    "LatentModel",
    "LieVAE",
    "NFPI",
    "SoftIntroVAE",
]
