"""Ground-truth factor datasets (``FactorDataset``): real files and procedural renderers."""

from typing import Any

from latentzoo.data.datasets.download import download_url
from latentzoo.data.datasets.dsprites import DSprites
from latentzoo.data.datasets.errors import (
    DatasetChecksumError,
    DatasetFormatError,
    DatasetNotFoundError,
)
from latentzoo.data.datasets.factors import FactorDataset
from latentzoo.data.datasets.proc_dsprites import ProcDSprites
from latentzoo.data.datasets.proc_shapes3d import ProcShapes3D
from latentzoo.data.datasets.shapes3d import Shapes3D

__all__ = [
    "DSprites",
    "DatasetChecksumError",
    "DatasetFormatError",
    "DatasetNotFoundError",
    "FactorDataset",
    "Falcor3D",
    "Isaac3D",
    "ProcDSprites",
    "ProcShapes3D",
    "Shapes3D",
    "download_url",
]

# Imported on first use, so that `python -m latentzoo.data.datasets.nvidia3d prepare ...` does not
# find its own module already imported by this package (runpy's RuntimeWarning).
_LAZY = {"Falcor3D": "nvidia3d", "Isaac3D": "nvidia3d"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# transformation sequences (latent_flow) and procedural digits
from latentzoo.data.datasets.proc_digits import ProcDigits, ProcDigitsDataModule  # noqa: E402
from latentzoo.data.datasets.sequence_datasets import (  # noqa: E402
    FactorSequences,
    ImageSequences,
    MNISTSequences,
    ProcDigitsSequences,
    SequenceDataset,
)

__all__ += [
    "FactorSequences",
    "ImageSequences",
    "MNISTSequences",
    "ProcDigits",
    "ProcDigitsDataModule",
    "ProcDigitsSequences",
    "SequenceDataset",
]

# procedural labelled / multi-object images
from latentzoo.data.datasets.proc_cifar import ProcCIFAR  # noqa: E402
from latentzoo.data.datasets.proc_multishapes import ProcMultiShapes  # noqa: E402

__all__ += ["ProcCIFAR", "ProcMultiShapes"]
