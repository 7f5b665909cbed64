"""Batch-norm running statistics, update by update: each update's batch mean
and unbiased variance recorded, so that a multi-process run can apply every
process's updates in the order one process would have."""

from typing import Dict, List

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["RunningStatisticsUpdates", "blend_running_statistics"]

_active: List["RunningStatisticsUpdates"] = []


def blend_running_statistics(norm: _BatchNorm, mean: torch.Tensor, unbiased_variance: torch.Tensor):
    """Updates ``norm``'s running statistics with one batch's mean and
    unbiased variance, as ``nn.BatchNorm*`` does in training (for code that
    normalises without calling the module, such as
    :func:`~fastmeta.nn.relation.separable_batch_norm`)."""
    with torch.no_grad():
        norm.num_batches_tracked += 1
        factor = 1.0 / float(norm.num_batches_tracked) if norm.momentum is None else norm.momentum
        norm.running_mean.lerp_(mean.detach(), factor)
        norm.running_var.lerp_(unbiased_variance.detach(), factor)
    for updates in _active:
        updates.record(norm, mean, unbiased_variance)


class RunningStatisticsUpdates:
    """Within ``with``, records every running-statistics update of
    ``model``'s batch norms, in order: ``updates[name]`` is a list of
    ``[2, C]`` tensors (batch mean, unbiased batch variance), and
    ``before[name]`` the running mean, variance and count at the start."""

    def __init__(self, model: nn.Module):
        self.names = {
            module: name
            for name, module in model.named_modules()
            if isinstance(module, _BatchNorm) and module.track_running_stats
        }
        self.updates: Dict[str, List[torch.Tensor]] = {name: [] for name in self.names.values()}
        self.before: Dict[str, List[torch.Tensor]] = {}
        self._hooks = []

    def record(self, norm: _BatchNorm, mean: torch.Tensor, unbiased_variance: torch.Tensor):
        if norm in self.names:
            self.updates[self.names[norm]].append(torch.stack([mean.detach(), unbiased_variance.detach()]))

    def _after_forward(self, norm, inputs, output):
        if norm.training:
            x = inputs[0].detach()
            dims = [d for d in range(x.dim()) if d != 1]
            variance, mean = torch.var_mean(x, dims, correction=1)
            self.record(norm, mean, variance)

    def __enter__(self):
        self.before = {
            name: [norm.running_mean.clone(), norm.running_var.clone(), norm.num_batches_tracked.clone()]
            for norm, name in self.names.items()
        }
        self._hooks = [norm.register_forward_hook(self._after_forward) for norm in self.names]
        _active.append(self)
        return self

    def __exit__(self, *exc):
        for hook in self._hooks:
            hook.remove()
        _active.remove(self)
