"""Meta-training and evaluation runs (``fastmeta train``, ``fastmeta evaluate``)."""

from .config import METHODS, Config, ConfigError, make_config
from .run import CheckpointError, Trained, evaluate, load_checkpoint, train

__all__ = [
    "Config",
    "ConfigError",
    "METHODS",
    "make_config",
    "CheckpointError",
    "Trained",
    "evaluate",
    "load_checkpoint",
    "train",
]
