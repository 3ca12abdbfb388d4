"""DataModules: ground-truth factor sets, sequences, image sets (procedural, folders, shards,
LMDBs, torchvision), multi-object scenes and cached latents."""

from latentzoo.data.ground_truth import (
    FactorSubset,
    GroundTruthDataModule,
)
from latentzoo.data.images import (
    ImageFolderDataModule,
    ProcBlobsDataModule,
    WebDatasetDataModule,
)
from latentzoo.data.labelled import (
    CIFAR10DataModule,
    ImageNet32DataModule,
    ProcCIFARDataModule,
    SklearnDigitsDataModule,
    TorchvisionDataModule,
)
from latentzoo.data.latents import LatentsDataModule
from latentzoo.data.lmdb import LMDBDataModule
from latentzoo.data.multishapes import (
    CelebAMAFLDataModule,
    CLEVRERFramesDataModule,
    ProcMultiShapesDataModule,
)
from latentzoo.data.sequence_datamodule import SequenceDataModule

__all__ = [
    "CIFAR10DataModule",
    "CLEVRERFramesDataModule",
    "CelebAMAFLDataModule",
    "FactorSubset",
    "GroundTruthDataModule",
    "ImageFolderDataModule",
    "ImageNet32DataModule",
    "LMDBDataModule",
    "LatentsDataModule",
    "ProcBlobsDataModule",
    "ProcCIFARDataModule",
    "ProcMultiShapesDataModule",
    "SequenceDataModule",
    "SklearnDigitsDataModule",
    "TorchvisionDataModule",
    "WebDatasetDataModule",
]
