from latentzoo.utils.errors import (
    CheckpointError,
    LatentzooError,
    MissingCapabilityError,
    NonFiniteLossError,
)
from latentzoo.utils.instantiators import instantiate_callbacks, instantiate_loggers
from latentzoo.utils.logging import RankedLogger
from latentzoo.utils.logging_utils import log_hyperparameters
from latentzoo.utils.rich_utils import print_config_tree, print_metrics_table
from latentzoo.utils.utils import extras, get_metric_value, task_wrapper

__all__ = [
    "CheckpointError",
    "LatentzooError",
    "MissingCapabilityError",
    "NonFiniteLossError",
    "RankedLogger",
    "extras",
    "get_metric_value",
    "instantiate_callbacks",
    "instantiate_loggers",
    "log_hyperparameters",
    "print_config_tree",
    "print_metrics_table",
    "task_wrapper",
]
