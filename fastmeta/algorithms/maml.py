"""MAML (Finn, Abbeel and Levine, "Model-Agnostic Meta-Learning for Fast
Adaptation of Deep Networks", 2017) with learn2learn's per-task interface
(``clone`` / ``adapt``), and the functional updates it is built on."""

from typing import List, Optional

import torch
from torch import nn

__all__ = ["MAML", "clone_module", "detach_module", "update_module", "maml_update"]


def clone_module(module: nn.Module, memo: Optional[dict] = None) -> nn.Module:
    """A copy of ``module`` whose parameters and buffers are differentiable
    clones of the original's: gradients through the copy reach the original.
    Shared parameters stay shared."""
    memo = {} if memo is None else memo
    clone = module.__new__(type(module))
    clone.__dict__ = module.__dict__.copy()
    clone._parameters = module._parameters.copy()
    clone._buffers = module._buffers.copy()
    clone._modules = module._modules.copy()
    # Buffers that do not require grad (running statistics) stay shared, as in learn2learn.
    for store, all_cloned in ((clone._parameters, True), (clone._buffers, False)):
        for key, t in store.items():
            if t is not None and (all_cloned or t.requires_grad):
                if id(t) not in memo:
                    memo[id(t)] = t.clone()
                store[key] = memo[id(t)]
    for key, child in clone._modules.items():
        if child is not None:
            clone._modules[key] = clone_module(child, memo)
    if hasattr(clone, "flatten_parameters"):  # RNNs keep a flat weight view
        clone = clone._apply(lambda t: t)
    return clone


def detach_module(module: nn.Module, keep_requires_grad: bool = False) -> nn.Module:
    """Cuts ``module``'s parameters and buffers, in place, from the graph
    that computed them (a clone's, after ``adapt``): gradients stop there.
    They stop requiring gradients, unless ``keep_requires_grad`` (then those
    that did still do, as new leaves)."""
    for m in module.modules():
        for tensors, only_differentiable in ((m._parameters, False), (m._buffers, True)):
            for t in tensors.values():
                if t is None or (only_differentiable and not t.requires_grad):
                    continue
                requires_grad = t.requires_grad
                t.detach_()
                if keep_requires_grad and requires_grad:
                    t.requires_grad_()
    return module


def update_module(
    module: nn.Module, updates: Optional[List[Optional[torch.Tensor]]] = None, memo: Optional[dict] = None
) -> nn.Module:
    """Replaces each parameter p of ``module`` (in ``parameters()`` order) by
    ``p + update``, differentiably; a None update leaves p. Without
    ``updates``, uses each parameter's ``.update`` attribute."""
    if updates is not None:
        params = list(module.parameters())
        if len(updates) != len(params):
            raise ValueError(f"update_module: {len(updates)} updates for {len(params)} parameters")
        for p, u in zip(params, updates):
            p.update = u
    return _apply_updates(module, {} if memo is None else memo)


def _apply_updates(module: nn.Module, memo: dict) -> nn.Module:
    for key, p in module._parameters.items():
        if p is None:
            continue
        if id(p) in memo:
            module._parameters[key] = memo[id(p)]
        elif getattr(p, "update", None) is not None:
            memo[id(p)] = module._parameters[key] = p + p.update
        else:
            memo[id(p)] = p
    for child in module._modules.values():
        if child is not None:
            _apply_updates(child, memo)
    if hasattr(module, "flatten_parameters"):
        module._apply(lambda t: t)
    return module


def maml_update(model: nn.Module, lr: float, grads: Optional[List[Optional[torch.Tensor]]] = None) -> nn.Module:
    """learn2learn's functional MAML step: each parameter p of ``model`` (in
    ``parameters()`` order) becomes ``p - lr * grad``, differentiably, in
    place; a None gradient leaves p. Without ``grads``, applies each
    parameter's ``.update``. Returns ``model``."""
    if grads is None:
        return update_module(model)
    return update_module(model, [None if g is None else -lr * g for g in _matched(model, grads, "grads")])


def _matched(model: nn.Module, values, name: str) -> list:
    values = list(values)
    count = len(list(model.parameters()))
    if len(values) != count:
        raise ValueError(f"{name}: {len(values)} given for the model's {count} parameters")
    return values


class _Learner(nn.Module):
    """learn2learn's wrappers pass unknown attributes through to the
    wrapped module (``learner.features`` is ``learner.module.features``)."""

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            module = self.__dict__["_modules"].get("module")
            if module is None:
                raise
            return getattr(module, name)


def _check_has_parameters(owner: str, params: List[torch.Tensor]):
    if not params:
        raise ValueError(f"{owner}.adapt: the module has no parameters to adapt")


def _gradients(
    loss: torch.Tensor, params: List[torch.Tensor], second_order: bool, allow_unused: bool, allow_nograd: bool
) -> List[Optional[torch.Tensor]]:
    """d loss / d params, None for parameters without one (where allowed)."""
    _check_has_parameters("MAML", params)
    if not allow_nograd:
        frozen = [i for i, p in enumerate(params) if not p.requires_grad]
        if frozen:
            raise RuntimeError(
                f"MAML.adapt: parameters {frozen} (in parameters() order) do not require grad; "
                "pass allow_nograd=True to adapt only the others"
            )
    wanted = [p for p in params if p.requires_grad]
    try:
        grads = torch.autograd.grad(
            loss, wanted, retain_graph=second_order, create_graph=second_order, allow_unused=allow_unused
        )
    except RuntimeError as error:
        if "appears to not have been used in the graph" in str(error):
            raise RuntimeError(
                "MAML.adapt: a parameter was not used to compute the loss; pass "
                "allow_unused=True to leave such parameters unchanged"
            ) from error
        raise
    it = iter(grads)
    return [next(it) if p.requires_grad else None for p in params]


class MAML(_Learner):
    """Model-Agnostic Meta-Learning (Finn et al. 2017), learn2learn's interface.

    ``learner = maml.clone()`` gives a differentiable copy of the module;
    ``learner.adapt(loss)`` takes one gradient step
    ``p <- p - lr * d loss / d p`` in place, keeping the graph (second order)
    unless ``first_order``. Gradients of a loss of the adapted learner reach
    the original module's parameters.

    Args:
        module: the learner.
        lr: the inner (fast-adaptation) learning rate.
        first_order: FOMAML: adapt without differentiating through the gradients.
        allow_unused: let ``adapt`` skip parameters the loss does not use
            (default: ``allow_nograd``); otherwise that raises.
        allow_nograd: let ``adapt`` skip parameters that do not require grad;
            otherwise that raises.

    Example:
        >>> import torch
        >>> import torch.nn.functional as F
        >>> from fastmeta.algorithms import MAML
        >>> maml = MAML(torch.nn.Linear(8, 1), lr=0.5)
        >>> x_support, y_support, x_query, y_query = (torch.randn(10, n) for n in (8, 1, 8, 1))
        >>> learner = maml.clone()
        >>> learner.adapt(F.mse_loss(learner(x_support), y_support))
        >>> F.mse_loss(learner(x_query), y_query).backward()   # gradients reach maml's parameters
    """

    def __init__(
        self,
        module: nn.Module,
        lr: float,
        first_order: bool = False,
        allow_unused: Optional[bool] = None,
        allow_nograd: bool = False,
    ):
        super().__init__()
        self.module = module
        self.lr = lr
        self.first_order = first_order
        self.allow_nograd = allow_nograd
        self.allow_unused = allow_nograd if allow_unused is None else allow_unused

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def adapt(
        self,
        loss: torch.Tensor,
        first_order: Optional[bool] = None,
        allow_unused: Optional[bool] = None,
        allow_nograd: Optional[bool] = None,
    ):
        """One inner gradient step on ``loss``, in place."""
        first_order = self.first_order if first_order is None else first_order
        allow_nograd = self.allow_nograd if allow_nograd is None else allow_nograd
        allow_unused = self.allow_unused if allow_unused is None else allow_unused
        params = list(self.module.parameters())
        grads = _gradients(loss, params, not first_order, allow_unused, allow_nograd)
        self.module = update_module(self.module, [None if g is None else -self.lr * g for g in grads])

    def clone(
        self,
        first_order: Optional[bool] = None,
        allow_unused: Optional[bool] = None,
        allow_nograd: Optional[bool] = None,
    ) -> "MAML":
        """A differentiable copy to adapt to one task; the original is unchanged."""
        return MAML(
            clone_module(self.module),
            lr=self.lr,
            first_order=self.first_order if first_order is None else first_order,
            allow_unused=self.allow_unused if allow_unused is None else allow_unused,
            allow_nograd=self.allow_nograd if allow_nograd is None else allow_nograd,
        )
