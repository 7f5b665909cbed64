from typing import Union

import torch

from .. import formulas
from . import _common

__all__ = ["attention_readout"]


def attention_readout(
    x: torch.Tensor,
    y: torch.Tensor,
    values: torch.Tensor,
    metric: str = "cosine",
    scale: Union[float, torch.Tensor] = 1.0,
) -> torch.Tensor:
    """Similarity attention: ``softmax_n(scale_q * s(x_q, y_n)) @ values``.

    Matching networks read out one-hot support labels this way; NTM / MANN
    memory reads use it with memory rows as keys and values and the key
    strength beta as ``scale``. Computed with an online softmax over tiles of
    keys, without a ``[B, Q, N]`` tensor.

    Args:
        x: queries ``[B, Q, D]`` or ``[Q, D]``.
        y: keys ``[B, N, D]`` or ``[N, D]``.
        values: ``[B, N, V]`` or ``[N, V]``.
        metric: ``"cosine"`` (default), ``"sqeuclidean"``, ``"euclidean"`` or ``"dot"``.
        scale: a float, or a tensor broadcastable to ``[B, Q]``.

    Returns:
        ``[B, Q, V]`` (or ``[Q, V]``).

    Example:
        >>> one_hot = torch.nn.functional.one_hot(support_labels, 20).float()
        >>> probs = fastmeta.ops.attention_readout(queries, support, one_hot)
    """
    op = "attention_readout"
    a = _common.metric_operands(op, x, y, metric, scale)
    _common.check_tensor(op, "values", values, like=x)
    if values.dim() != (2 if a.unbatched else 3) or values.shape[:-1] != y.shape[:-1]:
        raise ValueError(
            f"{op}: values must have shape {list(y.shape[:-1])} + [V] (one row per key of y), got {list(values.shape)}"
        )
    values = values.to(a.x.dtype)
    out, _ = _common.call(
        "attention_readout", a.x, a.y, values.unsqueeze(0) if a.unbatched else values, a.scale, metric
    )
    return a.output(out)


def _check_raw(op, metric, x, y, values, scale, *per_query):
    _common.check_raw_metric(op, metric)
    return _common.check_raw_operands(
        op,
        ("x", x, "BQD", None),
        ("y", y, "BND", None),
        ("values", values, "BNV", None),
        ("scale", scale, "BQ", None),
        *per_query,
    )


@torch.library.register_fake("fastmeta::attention_readout")
def _(x, y, values, scale, metric):
    size = _check_raw("attention_readout", metric, x, y, values, scale)
    return (
        x.new_empty(size["B"], size["Q"], size["V"]),
        x.new_empty(x.shape[:2], dtype=_common.accumulate_dtype(x.dtype)),
    )


@torch.library.register_fake("fastmeta::attention_readout_backward")
def _(grad, out, logsumexp, x, y, values, scale, metric):
    _check_raw(
        "attention_readout_backward",
        metric,
        x,
        y,
        values,
        scale,
        ("grad", grad, "BQV", None),
        ("out", out, "BQV", None),
        ("logsumexp", logsumexp, "BQ", _common.accumulate_dtype(x.dtype)),
    )
    return (torch.empty_like(x), torch.empty_like(y), torch.empty_like(values), torch.empty_like(scale))


def _setup_context(ctx, inputs, output):
    x, y, values, scale, metric = inputs
    ctx.metric = metric
    ctx.save_for_backward(output[0], output[1], x, y, values, scale)


def _backward(ctx, grad, _grad_logsumexp):
    out, logsumexp, x, y, values, scale = ctx.saved_tensors
    gx, gy, gvalues, gscale = _common.call(
        "attention_readout_backward", grad, out, logsumexp, x, y, values, scale, ctx.metric
    )
    return gx, gy, gvalues, gscale, None


def _reference_backward(grad, out, logsumexp, x, y, values, scale, metric):
    return _common.reference_vjp(
        lambda x, y, values, scale: formulas.attention_readout(x, y, values, metric, scale), (x, y, values, scale), grad
    )


_common.register_autograd("attention_readout", _backward, _setup_context)
_common.register_vmap_over_tasks("attention_readout")
_common.register_vmap_over_tasks("attention_readout_backward")
_common.register_reference_double_backward("attention_readout_backward", _reference_backward)
