from latentzoo.data.ground_truth import FactorSubset, GroundTruthDataModule

__all__ = ["FactorSubset", "GroundTruthDataModule"]

from latentzoo.data.images import (  # noqa: E402
    CIFAR10DataModule,
    ImageFolderDataModule,
    ProcBlobsDataModule,
    WebDatasetDataModule,
)

__all__ += [
    "CIFAR10DataModule",
    "ImageFolderDataModule",
    "ProcBlobsDataModule",
    "WebDatasetDataModule",
]
