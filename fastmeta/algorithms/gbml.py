"""GBML: gradient-based meta-learning with a learned gradient transform
(learn2learn's general wrapper): MAML (Finn et al., 2017) with the identity,
Meta-SGD (Li et al., 2017) with a per-parameter scale, Meta-Curvature (Park &
Oliva, 2019), Kronecker-factored KFO (Arnold et al., 2019), with
learn2learn's per-task interface (``clone`` / ``adapt``)."""

from typing import Callable, Optional

import torch
from torch import nn

from ..optim.gradient_updates import DifferentiableSGD, ParameterUpdate
from .maml import clone_module

__all__ = ["GBML"]


class GBML(nn.Module):
    """Wraps ``module`` for per-task adaptation with transformed gradients:
    ``clone()`` gives a differentiable copy, whose ``adapt(loss)`` replaces
    each parameter p by ``p - lr * T_p(grad)``, ``T_p = transform(p)``
    (:mod:`fastmeta.optim.transforms`). The meta-gradient of a loss after
    adaptation reaches ``module``'s parameters and the transforms'.

    Args:
        module: the learner.
        transform: called with each parameter, returns a module that maps its
            gradient to an update (or None: the plain gradient).
        lr: the adaptation step size.
        adapt_transform: adapt the transforms' parameters too (from the
            second ``adapt`` of a clone on, by the gradient of the loss with
            respect to them, before the module's step).
        first_order: drop the second-order terms of the meta-gradient.
        allow_unused: allow parameters the loss does not use (no update).
        allow_nograd: skip parameters with ``requires_grad=False``.
        compute_update: the :class:`~fastmeta.optim.ParameterUpdate` to use
            (``clone`` passes the clone's own).

    Example:
        >>> gbml = GBML(model, transforms.MetaCurvatureTransform, lr=0.1)
        >>> learner = gbml.clone()
        >>> learner.adapt(F.cross_entropy(learner(x_support), y_support))
        >>> F.cross_entropy(learner(x_query), y_query).backward()  # model and transform gradients
    """

    def __init__(
        self,
        module: nn.Module,
        transform: Callable[[torch.Tensor], Optional[nn.Module]],
        lr: float = 1.0,
        adapt_transform: bool = False,
        first_order: bool = False,
        allow_unused: bool = False,
        allow_nograd: bool = False,
        compute_update: Optional[ParameterUpdate] = None,
    ):
        super().__init__()
        self.module, self.transform, self.lr = module, transform, lr
        self.adapt_transform, self.first_order = adapt_transform, first_order
        self.allow_unused, self.allow_nograd = allow_unused, allow_nograd
        self.compute_update = compute_update or ParameterUpdate(module.parameters(), transform)
        self.diff_sgd = DifferentiableSGD(lr)
        self._params_updated = False

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def clone(
        self,
        first_order: Optional[bool] = None,
        allow_unused: Optional[bool] = None,
        allow_nograd: Optional[bool] = None,
        adapt_transform: Optional[bool] = None,
    ) -> "GBML":
        """A differentiable copy of the learner and of the transforms; the
        options default to this wrapper's."""
        return GBML(
            clone_module(self.module),
            self.transform,
            self.lr,
            self.adapt_transform if adapt_transform is None else adapt_transform,
            self.first_order if first_order is None else first_order,
            self.allow_unused if allow_unused is None else allow_unused,
            self.allow_nograd if allow_nograd is None else allow_nograd,
            clone_module(self.compute_update),
        )

    def adapt(
        self,
        loss: torch.Tensor,
        first_order: Optional[bool] = None,
        allow_nograd: Optional[bool] = None,
        allow_unused: Optional[bool] = None,
    ):
        """One adaptation step on ``loss``, in place; the options default to
        the clone's."""
        first_order = self.first_order if first_order is None else first_order
        allow_nograd = self.allow_nograd if allow_nograd is None else allow_nograd
        allow_unused = self.allow_unused if allow_unused is None else allow_unused
        second_order = not first_order
        if self.adapt_transform and self._params_updated:
            transform_grads = torch.autograd.grad(
                loss,
                list(self.compute_update.parameters()),
                create_graph=second_order,
                retain_graph=second_order,
                allow_unused=allow_unused,
            )
            self.diff_sgd(self.compute_update, list(transform_grads))
            self._params_updated = False
        updates = self.compute_update(
            loss,
            self.module.parameters(),
            create_graph=second_order or self.adapt_transform,
            retain_graph=second_order or self.adapt_transform,
            allow_unused=allow_unused,
            allow_nograd=allow_nograd,
        )
        self.diff_sgd(self.module, updates)
        self._params_updated = True
