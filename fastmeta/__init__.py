"""fastmeta: compiled CPU and CUDA kernels for meta-learning in PyTorch."""

from ._extension import load as _load

_C, _build_config = _load()

from . import algorithms, data, functional, nn, ops, optim, reference, training, vision  # noqa: E402
from .algorithms import clone_module, detach_module, update_module  # noqa: E402 (learn2learn's top-level names)
from .training import load_checkpoint  # noqa: E402

__version__ = "0.1.0"
__all__ = [
    "algorithms",
    "data",
    "functional",
    "nn",
    "ops",
    "optim",
    "reference",
    "training",
    "vision",
    "load_checkpoint",
    "clone_module",
    "detach_module",
    "update_module",
    "__version__",
]
