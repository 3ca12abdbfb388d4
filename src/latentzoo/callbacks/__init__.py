from latentzoo.callbacks.images import LatentTraversalGrid, ReconstructionGrid
from latentzoo.callbacks.run_info import LossReport, ResumeReport

__all__ = ["LatentTraversalGrid", "LossReport", "ReconstructionGrid", "ResumeReport"]
from latentzoo.callbacks.fid import FIDCallback  # noqa: E402

__all__ += ["FIDCallback"]
