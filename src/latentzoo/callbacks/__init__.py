from latentzoo.callbacks.fid import FIDCallback
from latentzoo.callbacks.images import LatentTraversalGrid, ReconstructionGrid
from latentzoo.callbacks.run_info import LossReport, ResumeReport

__all__ = ["FIDCallback", "LatentTraversalGrid", "LossReport", "ReconstructionGrid", "ResumeReport"]
