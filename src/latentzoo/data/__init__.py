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

# labelled image sets (torchvision MNIST/FashionMNIST/CIFAR/SVHN, ImageNet32, sk digits, proc_cifar)
from latentzoo.data.labelled import (  # noqa: E402
    ImageNet32DataModule,
    ProcCIFARDataModule,
    SklearnDigitsDataModule,
    TorchvisionDataModule,
)

__all__ += [
    "ImageNet32DataModule",
    "ProcCIFARDataModule",
    "SklearnDigitsDataModule",
    "TorchvisionDataModule",
]
