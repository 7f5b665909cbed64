from typing import Union

import torch

from .. import formulas
from . import _common

__all__ = ["similarity_log_softmax"]


def similarity_log_softmax(
    x: torch.Tensor, y: torch.Tensor, metric: str = "sqeuclidean", scale: Union[float, torch.Tensor] = 1.0
) -> torch.Tensor:
    """Log-softmax over keys of scaled similarities (Prototypical / Matching nets).

    ``log p(n | x_q) = scale_q * s(x_q, y_n) - log sum_m exp(scale_q * s(x_q, y_m))``
    with ``s = -d`` for the Euclidean metrics, the cosine similarity, or the
    dot product. Twice differentiable.

    Args:
        x: queries ``[B, Q, D]`` or ``[Q, D]``.
        y: keys (prototypes) ``[B, N, D]`` or ``[N, D]``.
        metric: ``"sqeuclidean"``, ``"euclidean"``, ``"cosine"`` or ``"dot"``.
        scale: a float, or a tensor broadcastable to ``[B, Q]`` (a learnable
            temperature); differentiable when it is a tensor.

    Returns:
        ``[B, Q, N]`` (or ``[Q, N]``) log-probabilities.

    Example:
        >>> logp = fastmeta.ops.similarity_log_softmax(torch.randn(15, 64), torch.randn(5, 64))
        >>> logp.exp().sum(-1)  # ones
    """
    a = _common.metric_operands("similarity_log_softmax", x, y, metric, scale)
    return a.output(_common.call("similarity_log_softmax", a.x, a.y, a.scale, metric))


def _check_raw(op, metric, x, y, scale, *outputs):
    _common.check_raw_metric(op, metric)
    return _common.check_raw_operands(
        op,
        ("x", x, "BQD", None),
        ("y", y, "BND", None),
        ("scale", scale, "BQ", None),
        *((name, t, "BQN", None) for name, t in outputs),
    )


@torch.library.register_fake("fastmeta::similarity_log_softmax")
def _(x, y, scale, metric):
    size = _check_raw("similarity_log_softmax", metric, x, y, scale)
    return x.new_empty(size["B"], size["Q"], size["N"])


@torch.library.register_fake("fastmeta::similarity_log_softmax_backward")
def _(grad, log_probs, x, y, scale, metric):
    _check_raw("similarity_log_softmax_backward", metric, x, y, scale, ("grad", grad), ("log_probs", log_probs))
    return torch.empty_like(x), torch.empty_like(y), torch.empty_like(scale)


def _setup_context(ctx, inputs, output):
    x, y, scale, metric = inputs
    ctx.metric = metric
    ctx.save_for_backward(output, x, y, scale)


def _backward(ctx, grad):
    log_probs, x, y, scale = ctx.saved_tensors
    gx, gy, gscale = _common.call("similarity_log_softmax_backward", grad, log_probs, x, y, scale, ctx.metric)
    return gx, gy, gscale, None


def _reference_backward(grad, log_probs, x, y, scale, metric):
    return _common.reference_vjp(
        lambda x, y, scale: formulas.similarity_log_softmax(x, y, metric, scale), (x, y, scale), grad
    )


_common.register_autograd("similarity_log_softmax", _backward, _setup_context)
_common.register_vmap_over_tasks("similarity_log_softmax")
_common.register_vmap_over_tasks("similarity_log_softmax_backward")
_common.register_reference_double_backward("similarity_log_softmax_backward", _reference_backward)
