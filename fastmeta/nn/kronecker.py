"""Kronecker-factored layers (learn2learn's ``l2l.nn``): a linear map of
``n x m`` matrices ``X -> L X R`` whose ``nm x nm`` matrix is ``R^T kron L``,
with ``n^2 + m^2`` parameters instead of ``n^2 m^2``."""

from typing import Optional

import torch
from torch import nn

__all__ = ["KroneckerLinear", "KroneckerRNN", "KroneckerLSTM"]


class KroneckerLinear(nn.Module):
    """``X [..., n, m] -> L X R (+ bias [n, m])``, ``L`` and ``R``
    initialised to the identity; with ``psd``, ``L^T L X R^T R`` (positive
    semi-definite factors). A vector of ``n * m`` elements is read as the
    column-major ``n x m`` matrix (``vec(X)``) and the result returned so.

    Args:
        n, m: the matrices' shape.
        bias: add a learned ``[n, m]`` bias (initialised to 0).
        psd: use ``L^T L`` and ``R^T R``.
        device: where the parameters live.
    """

    def __init__(self, n: int, m: int, bias: bool = True, psd: bool = False, device=None):
        super().__init__()
        self.left = nn.Parameter(torch.eye(n, device=device))
        self.right = nn.Parameter(torch.eye(m, device=device))
        self.bias = nn.Parameter(torch.zeros(n, m, device=device)) if bias else None
        self.psd = psd

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left, right = self.left, self.right
        if self.psd:
            left, right = left.T @ left, right.T @ right
        n, m = left.shape[0], right.shape[0]
        if x.dim() == 1:
            if x.shape[0] != n * m:
                raise ValueError(f"KroneckerLinear: a vector input needs n * m = {n * m} elements, got {x.shape[0]}")
            return self._apply_to(left, right, x.reshape(m, n).T).T.flatten()
        if tuple(x.shape[-2:]) != (n, m):
            raise ValueError(f"KroneckerLinear: inputs must end in ({n}, {m}), got shape {list(x.shape)}")
        return self._apply_to(left, right, x)

    def _apply_to(self, left, right, x):
        y = left @ x @ right
        return y if self.bias is None else y + self.bias


class KroneckerRNN(nn.Module):
    """An Elman RNN cell of Kronecker-factored maps: ``h' = sigma(W_h x +
    U_h h)``, output ``W_y h'``; returns ``(output, h')``."""

    def __init__(self, n: int, m: int, bias: bool = True, sigma: Optional[nn.Module] = None):
        super().__init__()
        self.W_h, self.U_h, self.W_y = (KroneckerLinear(n, m, bias=bias) for _ in range(3))
        self.sigma = sigma if sigma is not None else nn.Tanh()

    def forward(self, x: torch.Tensor, hidden: torch.Tensor):
        hidden = self.sigma(self.W_h(x) + self.U_h(hidden))
        return self.W_y(hidden), hidden


class KroneckerLSTM(nn.Module):
    """An LSTM cell of Kronecker-factored maps; returns ``(h, (h, c))``."""

    def __init__(self, n: int, m: int, bias: bool = True, sigma: Optional[nn.Module] = None):
        super().__init__()
        for gate in ("i", "f", "g", "o"):
            setattr(self, f"W_i{gate}", KroneckerLinear(n, m, bias=bias))
            setattr(self, f"W_h{gate}", KroneckerLinear(n, m, bias=bias))
        self.sigma = sigma if sigma is not None else nn.Sigmoid()

    def forward(self, x: torch.Tensor, hidden):
        h, c = hidden
        i = self.sigma(self.W_ii(x) + self.W_hi(h))
        f = self.sigma(self.W_if(x) + self.W_hf(h))
        g = torch.tanh(self.W_ig(x) + self.W_hg(h))
        o = self.sigma(self.W_io(x) + self.W_ho(h))
        c = f * c + i * g
        h = o * torch.tanh(c)
        return h, (h, c)
