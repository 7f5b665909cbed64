"""Meta-training and evaluation runs (``fastmeta train``, ``fastmeta evaluate``)."""

from .config import METHODS, Config, ConfigError, make_config
from .run import CheckpointError, Trained, evaluate, evaluate_one_shot_runs, load_checkpoint, train

__all__ = [
    "Config",
    "ConfigError",
    "METHODS",
    "make_config",
    "CheckpointError",
    "Trained",
    "evaluate",
    "evaluate_one_shot_runs",
    "load_checkpoint",
    "train",
]
