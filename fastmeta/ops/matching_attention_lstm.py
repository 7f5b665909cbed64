import numbers
from typing import Optional

import torch

from . import _common

__all__ = ["matching_attention_lstm"]


def matching_attention_lstm(
    query: torch.Tensor,
    support: torch.Tensor,
    weight_ih: torch.Tensor,
    weight_hh: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    steps: Optional[int] = None,
) -> torch.Tensor:
    """The attention LSTM of Matching networks' full-context query
    embeddings (Vinyals et al. 2016), ``steps`` reads of the support set:

    ``a = softmax(h g^T)``, ``r = a g``, ``(h, c) = LSTMCell([f, r], (h, c))``,
    ``h = h + f``, from ``h = f``, ``c = 0``, with ``nn.LSTMCell``'s gates
    and weights (``weight_ih [4D, 2D]``, ``weight_hh [4D, D]``, ``bias [4D]``
    = ``bias_ih + bias_hh``). The read enters the gates only through
    ``a (g W_r^T)``, so each step costs one product of ``h`` with ``[W_hh^T,
    g^T]``, a softmax, one ``[Q, S] x [S, 4D]`` product and a fused gate loop
    (CPU kernel, forward and backward). On other devices the same
    reorganised computation runs as PyTorch operations.

    Args:
        query: the queries' features ``f``, ``[B, Q, D]``.
        support: the contextualised support features ``g``, ``[B, S, D]``.
        steps: reads per query (default ``S``, as easyfsl).

    Returns:
        The final hidden states ``[B, Q, D]``; differentiable once in every input.

    Example:
        >>> cell = torch.nn.LSTMCell(128, 64)
        >>> h = fastmeta.ops.matching_attention_lstm(f, g, cell.weight_ih, cell.weight_hh,
        ...                                          cell.bias_ih + cell.bias_hh)
    """
    op = "matching_attention_lstm"
    _common.check_tensor(op, "query", query)
    for name, t in (("support", support), ("weight_ih", weight_ih), ("weight_hh", weight_hh)):
        _common.check_tensor(op, name, t, like=query, like_name="query")
    if query.dim() != 3 or support.dim() != 3 or support.shape[::2] != query.shape[::2]:
        raise ValueError(
            f"{op}: query must be [B, Q, D] and support [B, S, D], got {list(query.shape)} and {list(support.shape)}"
        )
    D = query.shape[2]
    if weight_ih.shape != (4 * D, 2 * D) or weight_hh.shape != (4 * D, D):
        raise ValueError(
            f"{op}: weight_ih must be [{4 * D}, {2 * D}] and weight_hh [{4 * D}, {D}] "
            f"for D = {D}, got {list(weight_ih.shape)} and {list(weight_hh.shape)}"
        )
    if bias is None:
        bias = query.new_zeros(4 * D)
    _common.check_tensor(op, "bias", bias, like=query, like_name="query")
    if bias.shape != (4 * D,):
        raise ValueError(f"{op}: bias must be [{4 * D}], got {list(bias.shape)}")
    steps = support.shape[1] if steps is None else steps
    if not isinstance(steps, numbers.Integral) or isinstance(steps, bool) or steps < 0:
        raise ValueError(f"{op}: steps must be an integer >= 0, got {steps!r}")
    steps = int(steps)
    if query.device.type != "cpu":
        return _composite(query, support, weight_ih, weight_hh, bias, steps)
    return _common.call("matching_attention_lstm", query, support, weight_ih, weight_hh, bias, steps)[0]


def _composite(query, support, weight_ih, weight_hh, bias, steps):
    """The CPU kernel's reorganised computation in PyTorch operations."""
    D = query.shape[-1]
    constant = query @ weight_ih[:, :D].T + bias
    support_gates = support @ weight_ih[:, D:].T
    keys = torch.cat([weight_hh.T.expand(len(support), -1, -1), support.transpose(1, 2)], 2)
    hidden, cell = query, torch.zeros_like(query)
    for _ in range(steps):
        both = torch.bmm(hidden, keys)
        gates = torch.baddbmm(constant + both[..., : 4 * D], torch.softmax(both[..., 4 * D :], -1), support_gates)
        input_forget = torch.sigmoid(gates[..., : 2 * D])
        cell = torch.addcmul(input_forget[..., D:] * cell, input_forget[..., :D], torch.tanh(gates[..., 2 * D : 3 * D]))
        hidden = torch.addcmul(query, torch.sigmoid(gates[..., 3 * D :]), torch.tanh(cell))
    return hidden


@torch.library.register_fake("fastmeta::matching_attention_lstm")
def _(query, support, weight_ih, weight_hh, bias, steps):
    sizes = _check_raw("matching_attention_lstm", query, support, weight_ih, weight_hh, ("bias", bias, "F", None))
    torch._check(steps >= 0, lambda: f"fastmeta::matching_attention_lstm: steps must be >= 0, got {steps}")
    B, Q, S, D = sizes["B"], sizes["Q"], sizes["S"], sizes["D"]
    new = query.new_empty
    return new(B, Q, D), new(steps, B, Q, D), new(steps, B, Q, D), new(steps, B, Q, S), new(steps, B, Q, 4 * D)


@torch.library.register_fake("fastmeta::matching_attention_lstm_backward")
def _(grad, query, support, weight_ih, weight_hh, hiddens, cells, attention, gates):
    _check_raw(
        "matching_attention_lstm_backward",
        query,
        support,
        weight_ih,
        weight_hh,
        ("grad", grad, "BQD", None),
        ("hiddens", hiddens, "KBQD", None),
        ("cells", cells, "KBQD", None),
        ("attention", attention, "KBQS", None),
        ("gates", gates, "KBQF", None),
    )
    return (
        torch.empty_like(query),
        torch.empty_like(support),
        torch.empty_like(weight_ih),
        torch.empty_like(weight_hh),
        weight_hh.new_empty(weight_hh.shape[0]),
    )


def _check_raw(op, query, support, weight_ih, weight_hh, *others):
    sizes = _common.check_raw_operands(
        op,
        ("query", query, "BQD", None),
        ("support", support, "BSD", None),
        ("weight_ih", weight_ih, "FE", None),
        ("weight_hh", weight_hh, "FD", None),
        *others,
    )
    D = sizes["D"]
    torch._check(
        sizes["F"] == 4 * D and sizes["E"] == 2 * D,
        lambda: (
            f"fastmeta::{op}: weight_ih must be [{4 * D}, {2 * D}] and weight_hh "
            f"[{4 * D}, {D}], got {list(weight_ih.shape)} and {list(weight_hh.shape)}"
        ),
    )
    return sizes


def _setup_context(ctx, inputs, output):
    query, support, weight_ih, weight_hh, _, _ = inputs
    _, hiddens, cells, attention, gates = output
    ctx.mark_non_differentiable(hiddens, cells, attention, gates)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(query, support, weight_ih, weight_hh, hiddens, cells, attention, gates)


def _backward(ctx, grad, *unused):
    if grad is None:  # the final hidden state took no part in the loss
        return (None,) * 6
    return (*_common.call("matching_attention_lstm_backward", grad, *ctx.saved_tensors), None)


_common.register_autograd("matching_attention_lstm", _backward, _setup_context)
