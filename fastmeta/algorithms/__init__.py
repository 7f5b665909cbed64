"""Meta-learning algorithms, one per module, each with its paper.

``MAML``, ``MetaSGD`` and ``GBML`` follow learn2learn's interface and semantics, so
``import fastmeta.algorithms as algorithms`` replaces ``learn2learn.algorithms``
in existing per-task scripts. ``BatchedMAML`` (MAML, first-order MAML,
Meta-SGD), ``ANIL``, ``Reptile`` and ``iMAML`` (implicit MAML) adapt all tasks
of a meta-batch at once, through the fused MLP kernels where the learner is an
MLP and torch.func otherwise.
"""

from ._task_batch import MetaBatchOutput
from .anil import ANIL
from .batched_maml import BatchedMAML
from .gbml import GBML
from .imaml import iMAML
from .maml import MAML, clone_module, detach_module, maml_update, update_module
from .meta_sgd import MetaSGD, meta_sgd_update
from .reptile import Reptile

__all__ = [
    "MAML",
    "MetaSGD",
    "GBML",
    "ANIL",
    "BatchedMAML",
    "MetaBatchOutput",
    "Reptile",
    "iMAML",
    "clone_module",
    "detach_module",
    "update_module",
    "maml_update",
    "meta_sgd_update",
]
