"""learn2learn's meta-layers: :class:`MetaModule` rewrites a model's
submodules (e.g. adds a learned layer after each linear one) and
:class:`ParameterTransform` computes a module's parameters from learned
transforms of them, for meta-learning what wraps a frozen model."""

from typing import Callable, Dict, Iterator, Type

import torch
from torch import nn

__all__ = ["MetaModule", "ParameterTransform"]


class ParameterTransform(nn.Module):
    """Runs ``module`` with each parameter ``p`` replaced by
    ``transform(p)(p)`` (a module built per parameter, e.g. a
    :class:`~fastmeta.nn.KroneckerLinear` or ``Scale``): the transforms'
    parameters are the ``meta_parameters``, learned through ``module``'s
    outputs; ``module``'s own parameters are left as they are."""

    def __init__(self, module: nn.Module, transform: Callable[[torch.Tensor], nn.Module]):
        super().__init__()
        self.module, self.transform = module, transform
        self._parameter_names = [name for name, _ in module.named_parameters()]
        self.parameter_transforms = nn.ModuleDict(
            {name.replace(".", "-"): transform(p) for name, p in module.named_parameters()}
        )

    def forward(self, *args, **kwargs):
        originals = {}
        for name in self._parameter_names:
            owner, _, leaf = name.rpartition(".")
            holder = self.module.get_submodule(owner) if owner else self.module
            originals[name] = (holder, leaf, holder._parameters[leaf])
            holder._parameters[leaf] = self.parameter_transforms[name.replace(".", "-")](holder._parameters[leaf])
        try:
            return self.module(*args, **kwargs)
        finally:
            for holder, leaf, original in originals.values():
                holder._parameters[leaf] = original

    def meta_parameters(self) -> Iterator[nn.Parameter]:
        return self.parameter_transforms.parameters()


class MetaModule(nn.Module):
    """Wraps ``module``, replacing each submodule whose class is a key of
    ``substitutions`` by ``substitutions[cls](submodule)``, recursively
    (children first); with ``freeze_module`` the original parameters stop
    requiring gradients, so only what the substitutions add is trained.
    ``meta_parameters()`` yields the parameters of the
    :class:`ParameterTransform` substitutes; ``module()`` returns the model
    with each ``ParameterTransform`` unwrapped.

    Example:
        >>> wrapped = MetaModule(nn.Sequential(nn.Linear(8, 4), nn.ReLU()),
        ...                      {nn.Linear: lambda l: ParameterTransform(l, lambda p: Scale(p.shape))})
    """

    def __init__(
        self,
        module: nn.Module,
        substitutions: Dict[Type[nn.Module], Callable[[nn.Module], nn.Module]],
        freeze_module=True,
    ):
        super().__init__()
        self.substitutions, self.freeze_module = substitutions, freeze_module
        if freeze_module:
            module.requires_grad_(False)
        self.wrapped_module = self._wrap(module)

    def _wrap(self, module: nn.Module) -> nn.Module:
        for name, child in module.named_children():
            module._modules[name] = self._wrap(child)
        substitute = self.substitutions.get(type(module))
        return substitute(module) if substitute is not None else module

    def meta_parameters(self) -> Iterator[nn.Parameter]:
        for m in self.wrapped_module.modules():
            if isinstance(m, ParameterTransform):
                yield from m.meta_parameters()

    def module(self) -> nn.Module:
        def unwrap(m):
            base = m.module if isinstance(m, ParameterTransform) else m
            for name, child in base.named_children():
                base._modules[name] = unwrap(child)
            return base

        return unwrap(self.wrapped_module)

    def forward(self, *args, **kwargs):
        return self.wrapped_module(*args, **kwargs)
