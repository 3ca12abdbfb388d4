from latentzoo.callbacks.checkpointing import Checkpoints
from latentzoo.callbacks.fid import FIDCallback
from latentzoo.callbacks.flow_paths import FlowPaths
from latentzoo.callbacks.images import LatentTraversalGrid, ReconstructionGrid, SampleGrid
from latentzoo.callbacks.keypoints import KeypointOverlay
from latentzoo.callbacks.run_info import LossReport, ResumeReport

__all__ = [
    "Checkpoints",
    "FIDCallback",
    "FlowPaths",
    "KeypointOverlay",
    "LatentTraversalGrid",
    "LossReport",
    "ReconstructionGrid",
    "ResumeReport",
    "SampleGrid",
]
