"""Gradient transforms with learn2learn's interface: a transform is called
with a parameter and returns a module that maps that parameter's gradient
to an update (or None: the gradient itself), for :class:`ParameterUpdate`,
:class:`~fastmeta.algorithms.GBML` and :class:`LearnableOptimizer`."""

import math
from typing import Callable, Dict, Optional, Union

import torch
from torch import nn

from ..nn.kronecker import KroneckerLinear

__all__ = [
    "ReshapedTransform",
    "ModuleTransform",
    "KroneckerTransform",
    "MetaCurvatureTransform",
    "TransformDictionary",
]


class ReshapedTransform(nn.Module):
    """Applies ``transform`` to the gradient viewed as ``shape``, and gives
    the update the gradient's shape."""

    def __init__(self, transform: nn.Module, shape):
        super().__init__()
        self.transform, self.in_shape = transform, tuple(shape)

    def forward(self, grad: torch.Tensor) -> torch.Tensor:
        return self.transform(grad.reshape(self.in_shape)).reshape(grad.shape)


class ModuleTransform:
    """For each parameter of P elements, ``module_cls(P, P)`` on its
    flattened gradient ``[1, P]`` (e.g. ``nn.Linear``: a full-matrix
    preconditioner, initialised as ``nn.Linear`` is)."""

    def __init__(self, module_cls: Callable[[int, int], nn.Module]):
        self.module_cls = module_cls

    def __call__(self, parameter: torch.Tensor) -> nn.Module:
        return ReshapedTransform(self.module_cls(parameter.numel(), parameter.numel()), (1, parameter.numel()))


def kronecker_dims(parameter: torch.Tensor):
    """``(n, m)`` of the Kronecker factors of a linear weight ``[n, m]``, a
    bias ``[n]`` (``m = 1``) or a convolution weight ``[out, n, kh, kw]``
    (``m = kh * kw``, one ``n x m`` matrix per output channel)."""
    shape = parameter.shape
    if len(shape) == 2:
        return shape[0], shape[1]
    if len(shape) == 1:
        return shape[0], 1
    if len(shape) == 4:
        return shape[1], shape[2] * shape[3]
    raise ValueError(f"KroneckerTransform: parameters of 1, 2 or 4 dimensions, got shape {list(shape)}")


class KroneckerTransform:
    """Kronecker-factored preconditioning (Arnold et al. 2019, "When MAML Can
    Adapt Fast and How to Assist When It Cannot"): each gradient, viewed as
    ``n x m`` matrices (:func:`kronecker_dims`), becomes ``L G R`` with
    ``kronecker_cls(n=n, m=m, bias=bias, psd=psd)``, by default
    :class:`~fastmeta.nn.KroneckerLinear` (``L``, ``R`` initialised to the
    identity)."""

    def __init__(self, kronecker_cls: Callable[..., nn.Module] = KroneckerLinear, bias: bool = False, psd: bool = True):
        self.kronecker_cls, self.bias, self.psd = kronecker_cls, bias, psd

    def __call__(self, parameter: torch.Tensor) -> nn.Module:
        n, m = kronecker_dims(parameter)
        return ReshapedTransform(self.kronecker_cls(n=n, m=m, bias=self.bias, psd=self.psd), (-1, n, m))


class MetaCurvatureTransform(nn.Module):
    """Meta-curvature (Park & Oliva 2019, "Meta-Curvature"): the gradient of
    a weight times a learned matrix along each of its modes, initialised to
    the identity: ``M_in G M_out`` for a linear weight, the same with a third
    matrix over the kernel positions for a convolution weight, and an
    elementwise scale for a bias; times ``lr``.

    Args:
        param: the parameter whose gradients it transforms (1, 2 or 4 dimensions).
        lr: a constant factor of the update.
    """

    def __init__(self, param: torch.Tensor, lr: float = 1.0):
        super().__init__()
        self.lr = lr
        shape = param.shape
        self.dim = len(shape)
        if self.dim == 1:
            self.mc = nn.Parameter(torch.ones_like(param))
        elif self.dim in (2, 4):
            self.mc_in = nn.Parameter(torch.eye(shape[0]))
            self.mc_out = nn.Parameter(torch.eye(shape[1]))
            if self.dim == 4:
                self.mc_f = nn.Parameter(torch.eye(math.prod(shape[2:])))
        else:
            raise ValueError(f"MetaCurvatureTransform: parameters of 1, 2 or 4 dimensions, got shape {list(shape)}")

    def forward(self, grad: torch.Tensor) -> torch.Tensor:
        if self.dim == 1:
            update = self.mc * grad
        elif self.dim == 2:
            update = self.mc_in @ grad @ self.mc_out
        else:
            update = torch.einsum("ia,bj,kf,abf->ijk", self.mc_in, self.mc_out, self.mc_f, grad.flatten(2)).reshape(
                grad.shape
            )
        return self.lr * update


class TransformDictionary:
    """A transform per module or parameter: ``{module or parameter:
    transform}``; parameters not listed get None (their plain gradient)."""

    def __init__(self, dictionary: Dict[Union[nn.Module, nn.Parameter], Callable]):
        self.param_to_transform = {}
        for key, transform in dictionary.items():
            if isinstance(key, nn.Module):
                self.param_to_transform.update({p: transform for p in key.parameters()})
            elif isinstance(key, nn.Parameter):
                self.param_to_transform[key] = transform
            else:
                raise ValueError(f"TransformDictionary: keys are modules or parameters, got a {type(key).__name__}")

    def __call__(self, param: torch.Tensor, *args, **kwargs) -> Optional[nn.Module]:
        transform = self.param_to_transform.get(param)
        return None if transform is None else transform(param, *args, **kwargs)
