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
        self.module = module
        # (owner submodule's name, parameter's name in it, its transform's key) per parameter.
        self._slots = [(*name.rpartition(".")[::2], name.replace(".", "-")) for name, _ in module.named_parameters()]
        self.parameter_transforms = nn.ModuleDict(
            {name.replace(".", "-"): transform(p) for name, p in module.named_parameters()}
        )

    def forward(self, *args, **kwargs):
        originals = []
        for owner, leaf, key in self._slots:
            holder = self.module.get_submodule(owner)
            originals.append((holder, leaf, holder._parameters[leaf]))
            holder._parameters[leaf] = self.parameter_transforms[key](holder._parameters[leaf])
        try:
            return self.module(*args, **kwargs)
        finally:
            for holder, leaf, original in originals:
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
        if freeze_module:
            module.requires_grad_(False)

        def wrap(m: nn.Module) -> nn.Module:
            for name, child in m.named_children():
                m._modules[name] = wrap(child)
            substitute = substitutions.get(type(m))
            return substitute(m) if substitute is not None else m

        self.wrapped_module = wrap(module)

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
