"""fastmeta: compiled CPU and CUDA kernels for meta-learning in PyTorch."""

from ._extension import load as _load

_C, _build_config = _load()

from . import algorithms, data, functional, nn, ops, optim, reference  # noqa: E402

__version__ = "0.1.0"
__all__ = ["algorithms", "data", "functional", "nn", "ops", "optim", "reference", "__version__"]
