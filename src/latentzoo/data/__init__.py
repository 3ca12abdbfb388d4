from latentzoo.data.ground_truth import FactorSubset, GroundTruthDataModule

__all__ = ["FactorSubset", "GroundTruthDataModule"]
