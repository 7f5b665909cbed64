"""Small layers of learn2learn's ``l2l.nn``."""

from typing import Callable, Optional, Sequence, Union

import torch
from torch import nn

__all__ = ["Lambda", "Scale"]


class Lambda(nn.Module):
    """A function as a module: ``forward(*args)`` is ``function(*args)``."""

    def __init__(self, function: Callable):
        super().__init__()
        self.lmb = function

    def forward(self, *args, **kwargs):
        return self.lmb(*args, **kwargs)


class Scale(nn.Module):
    """``x * alpha``, ``alpha`` a learned tensor of ``shape`` (an int, a
    shape, or None: one value) initialised to ``alpha`` (Meta-SGD's learned
    step sizes as a GBML transform)."""

    def __init__(self, shape: Optional[Union[int, Sequence[int]]] = None, alpha: float = 1.0):
        super().__init__()
        shape = (shape,) if isinstance(shape, int) else (1,) if shape is None else tuple(shape)
        self.alpha = nn.Parameter(torch.full(shape, float(alpha)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.alpha
