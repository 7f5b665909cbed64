"""Differentiable updates from transformed gradients, with learn2learn's
interface: :class:`ParameterUpdate` (one transform per parameter),
:class:`DifferentiableSGD` and :class:`LearnableOptimizer` (meta-descent)."""

import warnings
from typing import Callable, Iterable, List, Optional

import torch
from torch import nn

from ..algorithms.maml import update_module

__all__ = ["ParameterUpdate", "DifferentiableSGD", "LearnableOptimizer"]


class ParameterUpdate(nn.Module):
    """Maps a loss to an update per parameter: the gradient of each
    parameter of ``parameters``, passed through its transform
    (``transform(parameter)``: a module, or None for the plain gradient).

    ``forward(loss, parameters, create_graph, retain_graph, allow_unused,
    allow_nograd)`` returns the list of updates, None for a parameter without
    a gradient (unused with ``allow_unused``, or ``requires_grad=False``
    with ``allow_nograd``)."""

    def __init__(self, parameters: Iterable[torch.Tensor], transform: Callable[[torch.Tensor], Optional[nn.Module]]):
        super().__init__()
        modules, self.transforms_indices = [], []
        for param in parameters:
            t = transform(param)
            if t is not None and not isinstance(t, nn.Module):
                raise ValueError(f"ParameterUpdate: a transform returns a Module or None, got a {type(t).__name__}")
            self.transforms_indices.append(None if t is None else len(modules))
            if t is not None:
                modules.append(t)
        self.transforms_modules = nn.ModuleList(modules)

    def forward(
        self,
        loss: torch.Tensor,
        parameters: Iterable[torch.Tensor],
        create_graph: bool = False,
        retain_graph: bool = False,
        allow_unused: bool = False,
        allow_nograd: bool = False,
    ) -> List[Optional[torch.Tensor]]:
        parameters = list(parameters)
        differentiated = [p for p in parameters if p.requires_grad or not allow_nograd]
        try:
            grads = iter(
                torch.autograd.grad(
                    loss,
                    differentiated,
                    create_graph=create_graph,
                    retain_graph=retain_graph or create_graph,
                    allow_unused=allow_unused,
                )
            )
        except RuntimeError as error:
            raise RuntimeError(
                f"{error}\nParameterUpdate: pass allow_nograd=True for parameters with requires_grad=False, "
                "allow_unused=True for parameters the loss does not use"
            ) from None
        gradients = [next(grads) if p.requires_grad or not allow_nograd else None for p in parameters]
        return [
            g if i is None or g is None else self.transforms_modules[i](g)
            for g, i in zip(gradients, self.transforms_indices)
        ]


class DifferentiableSGD(nn.Module):
    """``module``'s parameters ``p <- p - lr * g``, differentiably (the new
    parameters are functions of the old and of ``g``); ``gradients`` default
    to the parameters' ``.grad``."""

    def __init__(self, lr: float):
        super().__init__()
        self.lr = lr

    def forward(self, module: nn.Module, gradients: Optional[List[Optional[torch.Tensor]]] = None):
        if gradients is None:
            gradients = [p.grad for p in module.parameters()]
        update_module(module, [None if g is None else g.mul(-self.lr) for g in gradients])


class LearnableOptimizer(nn.Module):
    """An optimizer whose update rule is learned (meta-descent: Sutton 1992;
    Baydin et al. 2018, "Online Learning Rate Adaptation with Hypergradient
    Descent"): ``step()`` replaces each parameter p of ``model`` that has a
    gradient by ``p - lr * transform(grad)``, a function of the transform's
    parameters, so the next loss's backward reaches them (train them with
    any optimizer over ``self.parameters()``). The old parameters are
    detached: the graph reaches back one step.

    Args:
        model: the module it updates.
        transform: called with each parameter of ``model``, returns a module
            (e.g. :class:`~fastmeta.optim.transforms.ModuleTransform`).
        lr: the step size.

    Example:
        >>> linear = nn.Linear(8, 2)
        >>> meta_optimizer = LearnableOptimizer(linear, transforms.MetaCurvatureTransform)
        >>> outer = torch.optim.SGD(meta_optimizer.parameters(), lr=0.01)
        >>> for x, y in batches:
        ...     meta_optimizer.zero_grad(); outer.zero_grad()
        ...     F.mse_loss(linear(x), y).backward()
        ...     outer.step()            # the transform, from the last step's update
        ...     meta_optimizer.step()   # the model
    """

    def __init__(self, model: nn.Module, transform: Callable[[torch.Tensor], nn.Module], lr: float = 1.0):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"LearnableOptimizer: model must be an nn.Module, got a {type(model).__name__}")
        self.info = {"model": model}  # not a submodule: its parameters are not the optimizer's
        self.transforms = nn.ModuleList([transform(p) for p in model.parameters()])
        self.lr = lr

    def step(self, closure=None):
        model = self.info["model"]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # reading .grad of the non-leaf parameters of the last step
            for param, transform in zip(model.parameters(), self.transforms):
                if param.grad is not None:
                    update = -self.lr * transform(param.grad.detach())
                    param.detach_()
                    param.requires_grad_(False)
                    param.update = update
            update_module(model)
            for param in model.parameters():
                if param.requires_grad:
                    param.retain_grad()

    def zero_grad(self, set_to_none: bool = False):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for p in self.info["model"].parameters():
                if p.grad is not None:
                    p.grad = None if set_to_none else torch.zeros_like(p)
