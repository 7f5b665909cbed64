from typing import Union

import torch

from .. import formulas
from . import _common

__all__ = ["similarity_cross_entropy"]

# On the CPU a reduced loss that needs gradients takes the fused
# forward-and-gradient op, which computes the similarities once where forward
# and backward apart compute them twice. It keeps a [block, N] buffer of
# similarities per thread (at most 16 MiB in float32 down to blocks of 64
# queries), so it stops at this many keys (included). The CUDA kernels
# compute that op as a forward and a backward, so CUDA takes the two ops.
FUSED_MAX_KEYS = 65536


def similarity_cross_entropy(
    x: torch.Tensor,
    y: torch.Tensor,
    target: torch.Tensor,
    metric: str = "sqeuclidean",
    scale: Union[float, torch.Tensor] = 1.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """Cross-entropy of the softmax over keys of scaled similarities.

    ``loss_q = -log softmax_n(scale_q * s(x_q, y_n))[target_q]``, computed with
    an online log-sum-exp over tiles of keys: no ``[B, Q, N]`` tensor is
    allocated, forward or backward, so heads with very many classes fit in
    memory. Twice differentiable (the second derivative does materialise the
    similarity matrix). On the CPU a reduced loss (``"mean"``, ``"sum"``)
    that needs gradients computes them in its forward, from the same
    similarities, and its backward returns them, times the output gradient;
    evaluate under ``torch.no_grad()`` to skip that work.

    Args:
        x: queries ``[B, Q, D]`` or ``[Q, D]``.
        y: keys (prototypes, class weights) ``[B, N, D]`` or ``[N, D]``.
        target: int64 class of each query, ``[B, Q]`` or ``[Q]``, in ``[0, N)``.
        metric: ``"sqeuclidean"``, ``"euclidean"``, ``"cosine"`` or ``"dot"``.
        scale: a float, or a tensor broadcastable to ``[B, Q]``.
        reduction: ``"mean"`` (over all queries of all tasks), ``"sum"`` or
            ``"none"`` (``[B, Q]``).

    Example:
        >>> protos = fastmeta.ops.class_prototypes(support, support_labels, 5)
        >>> loss = fastmeta.ops.similarity_cross_entropy(queries, protos, query_labels)
    """
    op = "similarity_cross_entropy"
    a = _common.metric_operands(op, x, y, metric, scale)
    _common.check_choice(op, "reduction", reduction, _common.REDUCTIONS)
    _common.check_tensor(op, "target", target, floating=False)
    if target.dtype != torch.int64:
        raise TypeError(f"{op}: target must have dtype torch.int64, got {target.dtype}")
    if target.device != a.x.device:
        raise ValueError(f"{op}: target is on {target.device} but x is on {a.x.device}")
    want = a.x.shape[1:2] if a.unbatched else a.x.shape[:2]
    if target.shape != want:
        raise ValueError(f"{op}: target must have shape {list(want)} (one class per query), got {list(target.shape)}")
    target = target.unsqueeze(0) if a.unbatched else target
    # The fused loss-and-gradient op serves plain autograd; under torch.func's
    # transforms the two-pass ops do (their rules work at every order there).
    needs_grad = (
        torch.is_grad_enabled() and any(t.requires_grad for t in (a.x, a.y, a.scale)) and not _common.functorch_active()
    )
    queries = a.x.shape[0] * a.x.shape[1]
    fused = a.x.device.type == "cpu" and queries > 0 and 1 <= a.y.shape[1] <= FUSED_MAX_KEYS
    if reduction != "none" and needs_grad and fused:
        weight = 1.0 if reduction == "sum" else 1.0 / queries
        task_loss = _common.call("similarity_cross_entropy_with_grad", a.x, a.y, target, a.scale, metric, weight)[0]
        return a.output(task_loss.sum())
    loss, _ = _common.call("similarity_cross_entropy", a.x, a.y, target, a.scale, metric)
    return a.output(formulas.reduce_loss(loss, reduction))


def _check_raw(op, metric, x, y, target, scale, *per_query):
    _common.check_raw_metric(op, metric)
    return _common.check_raw_operands(
        op,
        ("x", x, "BQD", None),
        ("y", y, "BND", None),
        ("target", target, "BQ", torch.int64),
        ("scale", scale, "BQ", None),
        *per_query,
    )


@torch.library.register_fake("fastmeta::similarity_cross_entropy")
def _(x, y, target, scale, metric):
    _check_raw("similarity_cross_entropy", metric, x, y, target, scale)
    return x.new_empty(x.shape[:2]), x.new_empty(x.shape[:2], dtype=_common.accumulate_dtype(x.dtype))


@torch.library.register_fake("fastmeta::similarity_cross_entropy_backward")
def _(grad, x, y, target, scale, logsumexp, metric):
    _check_raw(
        "similarity_cross_entropy_backward",
        metric,
        x,
        y,
        target,
        scale,
        ("grad", grad, "BQ", None),
        ("logsumexp", logsumexp, "BQ", _common.accumulate_dtype(x.dtype)),
    )
    return torch.empty_like(x), torch.empty_like(y), torch.empty_like(scale)


def _setup_context(ctx, inputs, output):
    x, y, target, scale, metric = inputs
    ctx.metric = metric
    ctx.save_for_backward(x, y, target, scale, output[1])


def _backward(ctx, grad, _grad_logsumexp):
    x, y, target, scale, logsumexp = ctx.saved_tensors
    gx, gy, gscale = _common.call("similarity_cross_entropy_backward", grad, x, y, target, scale, logsumexp, ctx.metric)
    return gx, gy, None, gscale, None


def _reference_backward(grad, x, y, target, scale, logsumexp, metric):
    return _common.reference_vjp(
        lambda x, y, scale: formulas.similarity_cross_entropy(x, y, target, metric, scale, "none"), (x, y, scale), grad
    )


@torch.library.register_fake("fastmeta::similarity_cross_entropy_with_grad")
def _(x, y, target, scale, metric, weight):
    _check_raw("similarity_cross_entropy_with_grad", metric, x, y, target, scale)
    return x.new_empty(x.shape[0]), torch.empty_like(x), torch.empty_like(y), torch.empty_like(scale)


def _setup_context_with_grad(ctx, inputs, output):
    x, y, target, scale, metric, weight = inputs
    ctx.metric, ctx.weight = metric, weight
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)  # no [B, Q, D] of zeros for the gradient outputs' gradients
    ctx.save_for_backward(x, y, target, scale, *output[1:])


def _backward_with_grad(ctx, grad_loss, *_unused):
    x, y, target, scale, grad_x, grad_y, grad_scale = ctx.saved_tensors
    if torch.is_grad_enabled():
        # Double backward (create_graph): the gradient must itself be
        # differentiable, so it is taken through the reference.
        inputs = [t for t in (x, y, scale) if t.requires_grad]
        task_loss = ctx.weight * formulas.similarity_cross_entropy(x, y, target, ctx.metric, scale, "none").sum(1)
        found = iter(torch.autograd.grad(task_loss, inputs, grad_loss, create_graph=True))
        grad_x, grad_y, grad_scale = (next(found) if t.requires_grad else None for t in (x, y, scale))
        return grad_x, grad_y, None, grad_scale, None, None
    if grad_loss is None:  # no gradient reached the loss (gradgradcheck's calls do this)
        return None, None, None, None, None, None
    # loss.backward(): the gradients are those computed in the forward, as they
    # are (a backward with retain_graph=True returns them again). Only where the
    # output gradient's values can be read without a device sync: a plain CPU
    # tensor, not one that torch.compile or opcheck traces.
    if type(grad_loss) is torch.Tensor and grad_loss.device.type == "cpu" and bool((grad_loss == 1).all()):
        return grad_x, grad_y, None, grad_scale, None, None
    per_task = grad_loss.view(-1, 1)
    return (per_task.unsqueeze(-1) * grad_x, per_task.unsqueeze(-1) * grad_y, None, per_task * grad_scale, None, None)


_common.register_autograd("similarity_cross_entropy", _backward, _setup_context)
_common.register_autograd("similarity_cross_entropy_with_grad", _backward_with_grad, _setup_context_with_grad)
_common.register_vmap_over_tasks("similarity_cross_entropy_with_grad")
_common.register_vmap_over_tasks("similarity_cross_entropy")
_common.register_vmap_over_tasks("similarity_cross_entropy_backward")
_common.register_reference_double_backward("similarity_cross_entropy_backward", _reference_backward)
