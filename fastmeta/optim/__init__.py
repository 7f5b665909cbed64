"""Optimizers: the learned-optimizer kernels' meta-training, and
learn2learn's differentiable updates and gradient transforms."""

from . import transforms
from .gradient_updates import DifferentiableSGD, LearnableOptimizer, ParameterUpdate
from .learned import LearnedOptimizer, truncated_unrolls

__all__ = [
    "DifferentiableSGD",
    "LearnableOptimizer",
    "LearnedOptimizer",
    "ParameterUpdate",
    "transforms",
    "truncated_unrolls",
]
