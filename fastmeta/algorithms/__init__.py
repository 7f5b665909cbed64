"""Meta-learning algorithms.

``MAML`` and ``MetaSGD`` follow learn2learn's interface and semantics, so
``import fastmeta.algorithms as algorithms`` replaces ``learn2learn.algorithms``
in existing per-task scripts. ``BatchedMAML`` (MAML, FOMAML, Meta-SGD), ``ANIL``,
``Reptile`` and ``iMAML`` (implicit MAML) adapt all tasks of a meta-batch at once, through the fused MLP
kernels where the learner is an MLP and torch.func otherwise.
"""

from .batched import ANIL, BatchedMAML, MetaBatchOutput, Reptile, iMAML
from .maml import MAML, MetaSGD, clone_module, maml_update, meta_sgd_update, update_module

__all__ = ["MAML", "MetaSGD", "ANIL", "BatchedMAML", "MetaBatchOutput", "Reptile", "iMAML",
           "clone_module", "update_module", "maml_update", "meta_sgd_update"]
