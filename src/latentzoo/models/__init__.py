from latentzoo.models.base import LatentModel
from latentzoo.models.beta_vae import BetaVAE

__all__ = ["BetaVAE", "LatentModel"]

from latentzoo.models.beta_tcvae import BetaTCVAE  # noqa: E402
from latentzoo.models.factor_vae import FactorVAE  # noqa: E402
from latentzoo.models.lie_vae import LieGroupVAE, LieVAE  # noqa: E402

__all__ += ["BetaTCVAE", "FactorVAE", "LieGroupVAE", "LieVAE"]
