from latentzoo.data.ground_truth import FactorSubset, GroundTruthDataModule

__all__ = ["FactorSubset", "GroundTruthDataModule"]
from latentzoo.data.latents import LatentsDataModule  # noqa: E402

__all__ += ["LatentsDataModule"]
