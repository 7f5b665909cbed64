"""Reptile (Nichol, Achiam and Schulman, "On First-Order Meta-Learning
Algorithms", 2018), batched."""

import torch
from torch import nn

from ._task_batch import TaskBatchLearner, check_tasks
from .engine import Loss, flat_to_dict

__all__ = ["Reptile"]


class Reptile(TaskBatchLearner):
    """Reptile (Nichol et al. 2018), batched: each task's copy takes
    ``inner_steps`` SGD steps on its data, then ``step`` moves the module
    towards their mean: theta <- theta + outer_lr * mean_t(theta_t - theta).

    ``reptile.step(x, y)`` on ``[T, N, ...]`` tensors updates the module's
    parameters in place (no optimizer needed) and returns the tasks' mean
    loss before adaptation (None with no inner steps).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from fastmeta.algorithms import Reptile
        >>> from fastmeta.data import sinusoid_tasks
        >>> net = nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 1))
        >>> reptile = Reptile(net, inner_lr=0.02, inner_steps=5, outer_lr=0.1)
        >>> x, y, _, _ = sinusoid_tasks(5, 10, num_query=1)
        >>> loss = reptile.step(x, y)   # moves net's parameters towards the adapted ones
    """

    def __init__(
        self, module: nn.Module, inner_lr: float, inner_steps: int = 5, outer_lr: float = 0.1, loss: Loss = "mse"
    ):
        super().__init__(module, inner_steps, loss)
        self.inner_lr = float(inner_lr)
        self.outer_lr = float(outer_lr)

    def _mean_adapted(self, x: torch.Tensor, y: torch.Tensor):
        """(theta [P], the tasks' mean adapted parameters [P], their mean loss
        before adaptation or None with no inner steps)."""
        check_tasks("Reptile", self._device(), x_support=x, y_support=y)
        theta, thetas, losses = self._adapted(x, y, self.inner_steps)
        self._update_running_statistics(x)
        return theta, thetas.mean(0), losses[0].mean() if losses else None

    @torch.no_grad()
    def step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        theta, mean, loss = self._mean_adapted(x, y)
        new_theta = theta + self.outer_lr * (mean - theta)
        for name, value in flat_to_dict(self.module, new_theta).items():
            self.module.get_parameter(name).copy_(value)
        return loss

    @torch.no_grad()
    def accumulate_grad(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Reptile's step as a gradient, for an optimizer (and an all-reduce
        across processes): adds ``theta - mean_t(theta_t)`` to each
        parameter's ``.grad``, so that SGD with learning rate ``outer_lr``
        makes :meth:`step`'s update. Returns the tasks' mean loss before
        adaptation (None with no inner steps)."""
        theta, mean, loss = self._mean_adapted(x, y)
        for name, value in flat_to_dict(self.module, theta - mean).items():
            param = self.module.get_parameter(name)
            param.grad = value.clone() if param.grad is None else param.grad + value
        return loss
