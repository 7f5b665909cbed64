import torch

from .. import formulas
from . import _common

__all__ = ["pairwise_distance"]


def pairwise_distance(x: torch.Tensor, y: torch.Tensor, metric: str = "sqeuclidean") -> torch.Tensor:
    """Distances between every query and every key.

    ``d(x_q, y_n)`` is ``||x_q - y_n||^2`` (``"sqeuclidean"``), ``||x_q - y_n||``
    (``"euclidean"``, gradient 0 where it is 0, as ``torch.cdist``) or
    ``1 - cos(x_q, y_n)`` (``"cosine"``).

    Args:
        x: queries ``[B, Q, D]`` or ``[Q, D]``.
        y: keys ``[B, N, D]`` or ``[N, D]``.
        metric: ``"sqeuclidean"``, ``"euclidean"`` or ``"cosine"``.

    Returns:
        ``[B, Q, N]`` (or ``[Q, N]``) distances.

    Example:
        >>> d = fastmeta.ops.pairwise_distance(torch.randn(5, 8), torch.randn(3, 8))
        >>> d.shape
        torch.Size([5, 3])
    """
    a = _common.metric_operands("pairwise_distance", x, y, metric, metrics=_common.DISTANCE_METRICS)
    return a.output(_common.call("pairwise_distance", a.x, a.y, metric))


def _check_raw(op, metric, x, y, *outputs):
    _common.check_raw_metric(op, metric, _common.DISTANCE_METRICS)
    return _common.check_raw_operands(
        op, ("x", x, "BQD", None), ("y", y, "BND", None), *((name, t, "BQN", None) for name, t in outputs)
    )


@torch.library.register_fake("fastmeta::pairwise_distance")
def _(x, y, metric):
    size = _check_raw("pairwise_distance", metric, x, y)
    return x.new_empty(size["B"], size["Q"], size["N"])


@torch.library.register_fake("fastmeta::pairwise_distance_backward")
def _(grad, distance, x, y, metric):
    _check_raw("pairwise_distance_backward", metric, x, y, ("grad", grad), ("distance", distance))
    return torch.empty_like(x), torch.empty_like(y)


def _setup_context(ctx, inputs, output):
    x, y, metric = inputs
    ctx.metric = metric
    ctx.save_for_backward(output, x, y)


def _backward(ctx, grad):
    distance, x, y = ctx.saved_tensors
    gx, gy = _common.call("pairwise_distance_backward", grad, distance, x, y, ctx.metric)
    return gx, gy, None


_common.register_autograd("pairwise_distance", _backward, _setup_context)
_common.register_vmap_over_tasks("pairwise_distance")
_common.register_vmap_over_tasks("pairwise_distance_backward")
_common.register_reference_double_backward(
    "pairwise_distance_backward",
    lambda grad, distance, x, y, metric: _common.reference_vjp(
        lambda x, y: formulas.pairwise_distance(x, y, metric), (x, y), grad
    ),
)
