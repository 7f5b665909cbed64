"""Batched Hessian-vector products and the meta-gradient engine of
second-order MAML, under their public names. The engine lives with the
algorithms it serves, in :mod:`fastmeta.algorithms.engine`."""

from .algorithms import engine as _engine
from .algorithms.engine import *  # noqa: F401,F403

__all__ = _engine.__all__
