"""Meta-SGD (Li, Zhou, Chen and Li, "Meta-SGD: Learning to Learn Quickly for
Few-Shot Learning", 2017) with learn2learn's per-task interface: MAML whose
inner learning rates, one per parameter entry, are meta-learned too."""

from typing import Iterable, List, Optional

import torch
from torch import nn

from .maml import _check_has_parameters, _Learner, _matched, clone_module, update_module

__all__ = ["MetaSGD", "meta_sgd_update"]


def meta_sgd_update(
    model: nn.Module, lrs: Optional[List[torch.Tensor]] = None, grads: Optional[List[Optional[torch.Tensor]]] = None
) -> nn.Module:
    """learn2learn's functional Meta-SGD step: each parameter p becomes ``p -
    lr_p * grad_p`` (``lrs`` and ``grads`` in ``parameters()`` order),
    differentiably, in place. Without both, applies each parameter's
    ``.update``. Returns ``model``."""
    if lrs is None or grads is None:
        return update_module(model)
    lrs = _matched(model, lrs, "lrs")
    return update_module(model, [None if g is None else -lr * g for lr, g in zip(lrs, _matched(model, grads, "grads"))])


class MetaSGD(_Learner):
    """Meta-SGD (Li et al. 2017), learn2learn's interface: MAML with a learned
    learning rate per parameter entry (``lrs``, initialised to ``lr``).

    ``lrs`` given as tensors that are not leaves (a learning rate computed by
    another module, or a clone's) are kept as they are, so gradients flow
    through them; leaf tensors become this module's parameters.

    Example:
        >>> import torch
        >>> import torch.nn.functional as F
        >>> from fastmeta.algorithms import MetaSGD
        >>> meta_sgd = MetaSGD(torch.nn.Linear(8, 1), lr=0.5)
        >>> x_support, y_support, x_query, y_query = (torch.randn(10, n) for n in (8, 1, 8, 1))
        >>> learner = meta_sgd.clone()
        >>> learner.adapt(F.mse_loss(learner(x_support), y_support))
        >>> F.mse_loss(learner(x_query), y_query).backward()   # gradients for the weights and lrs
    """

    def __init__(
        self,
        module: nn.Module,
        lr: float = 1.0,
        first_order: bool = False,
        lrs: Optional[Iterable[torch.Tensor]] = None,
    ):
        super().__init__()
        self.module = module
        if lrs is None:
            lrs = [torch.ones_like(p) * lr for p in module.parameters()]
        lrs = list(lrs)
        if len(lrs) != len(list(module.parameters())):
            raise ValueError(
                f"MetaSGD: {len(lrs)} learning rates for the module's {len(list(module.parameters()))} parameters"
            )
        if all(lr.grad_fn is None for lr in lrs):
            self.lrs = nn.ParameterList([lr if isinstance(lr, nn.Parameter) else nn.Parameter(lr) for lr in lrs])
        else:
            self.lrs = lrs  # non-leaf: kept in the graph, not registered as parameters
        self.first_order = first_order

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def clone(self) -> "MetaSGD":
        """A differentiable copy (module and learning rates) to adapt to one task."""
        return MetaSGD(clone_module(self.module), lrs=[lr.clone() for lr in self.lrs], first_order=self.first_order)

    def adapt(self, loss: torch.Tensor, first_order: Optional[bool] = None):
        """One inner step ``p <- p - lr_p * d loss / d p``, in place."""
        first_order = self.first_order if first_order is None else first_order
        params = list(self.module.parameters())
        _check_has_parameters("MetaSGD", params)
        grads = torch.autograd.grad(loss, params, retain_graph=not first_order, create_graph=not first_order)
        self.module = update_module(self.module, [-lr * g for lr, g in zip(self.lrs, grads)])
