"""Ground-truth factor datasets (``FactorDataset``) and their procedural renderers."""

from latentzoo.data.datasets.factors import FactorDataset
from latentzoo.data.datasets.proc_dsprites import ProcDSprites

__all__ = ["FactorDataset", "ProcDSprites"]
