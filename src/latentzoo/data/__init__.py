from latentzoo.data.ground_truth import FactorSubset, GroundTruthDataModule
from latentzoo.data.latents import LatentsDataModule
from latentzoo.data.sequences import SequenceDataModule

__all__ = ["FactorSubset", "GroundTruthDataModule", "LatentsDataModule", "SequenceDataModule"]
