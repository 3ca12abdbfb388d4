from latentzoo.data.ground_truth import FactorSubset, GroundTruthDataModule
from latentzoo.data.images import (
    CIFAR10DataModule,
    ImageFolderDataModule,
    ProcBlobsDataModule,
    WebDatasetDataModule,
)
from latentzoo.data.latents import LatentsDataModule
from latentzoo.data.multishapes import (
    CelebAMAFLDataModule,
    CLEVRERFramesDataModule,
    ProcMultiShapesDataModule,
)
from latentzoo.data.sequences import SequenceDataModule

__all__ = [
    "CLEVRERFramesDataModule",
    "CelebAMAFLDataModule",
    "ProcMultiShapesDataModule",
    "CIFAR10DataModule",
    "FactorSubset",
    "GroundTruthDataModule",
    "ImageFolderDataModule",
    "LatentsDataModule",
    "ProcBlobsDataModule",
    "SequenceDataModule",
    "WebDatasetDataModule",
]
