from latentzoo.data.ground_truth import FactorSubset, GroundTruthDataModule

__all__ = ["FactorSubset", "GroundTruthDataModule"]

from latentzoo.data.sequences import SequenceDataModule  # noqa: E402

__all__ += ["SequenceDataModule"]
