"""MAML's sinusoid regression tasks."""

import math
from typing import Optional, Tuple

import torch

__all__ = ["sinusoid_tasks"]


def sinusoid_tasks(
    num_tasks: int,
    num_points: int,
    *,
    amplitude=(0.1, 5.0),
    phase=(0.0, math.pi),
    x_range=(-5.0, 5.0),
    num_query: Optional[int] = None,
    return_parameters: bool = False,
    generator: Optional[torch.Generator] = None,
    dtype=torch.float32,
    device=None,
) -> Tuple[torch.Tensor, ...]:
    """Sinusoid regression tasks (Finn et al. 2017): y = A sin(x - phi).

    Each task draws A uniformly from ``amplitude`` and phi from ``phase``;
    its points draw x uniformly from ``x_range``.

    Returns:
        ``(x, y)`` of shape ``[T, K, 1]``; with ``num_query``, also query points
        of the same tasks: ``(x_support, y_support, x_query, y_query)``. With
        ``return_parameters``, the tasks' amplitudes and phases ``[T]`` follow.
    """
    if num_tasks < 0 or num_points < 0 or (num_query is not None and num_query < 0):
        raise ValueError("sinusoid_tasks: the numbers of tasks and points must be >= 0")

    def uniform(shape, bounds):
        u = torch.rand(shape, generator=generator, dtype=dtype)
        return (bounds[0] + (bounds[1] - bounds[0]) * u).to(device)

    amp = uniform((num_tasks, 1, 1), amplitude)
    shift = uniform((num_tasks, 1, 1), phase)
    x = uniform((num_tasks, num_points + (num_query or 0), 1), x_range)
    y = amp * torch.sin(x - shift)
    out = (x, y) if num_query is None else (x[:, :num_points], y[:, :num_points], x[:, num_points:], y[:, num_points:])
    return out + (amp.view(-1), shift.view(-1)) if return_parameters else out
