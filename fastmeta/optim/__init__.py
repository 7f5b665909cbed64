"""Optimizers and meta-training built on fastmeta's learned-optimizer kernels."""

from .learned import LearnedOptimizer, truncated_unrolls

__all__ = ["LearnedOptimizer", "truncated_unrolls"]
