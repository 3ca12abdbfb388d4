from latentzoo.callbacks.images import LatentTraversalGrid, ReconstructionGrid
from latentzoo.callbacks.run_info import LossReport, ResumeReport

__all__ = ["LatentTraversalGrid", "LossReport", "ReconstructionGrid", "ResumeReport"]
from latentzoo.callbacks.flow_paths import FlowPaths  # noqa: E402

__all__ += ["FlowPaths"]
