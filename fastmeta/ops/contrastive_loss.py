import numbers

import torch

from .. import formulas
from . import _common

__all__ = ["contrastive_loss"]


def contrastive_loss(
    x1: torch.Tensor, x2: torch.Tensor, same: torch.Tensor, margin: float = 1.0, reduction: str = "mean"
) -> torch.Tensor:
    """Contrastive loss of Siamese networks (Hadsell, Chopra & LeCun 2006).

    ``loss_i = same_i * d_i^2 + (1 - same_i) * max(margin - d_i, 0)^2`` with
    ``d_i = ||x1_i - x2_i||`` (gradient 0 where ``d_i = 0``).

    Args:
        x1, x2: embeddings of the two sides of each pair, ``[..., D]``, same shape.
        same: 1 for pairs of the same class, 0 otherwise, shape ``[...]``; bool or
            floating (a floating ``same`` is differentiable).
        margin: the margin for dissimilar pairs.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (shape ``[...]``).

    Example:
        >>> loss = fastmeta.ops.contrastive_loss(f(a), f(b), (label_a == label_b).float())
    """
    op = "contrastive_loss"
    _common.check_tensor(op, "x1", x1)
    _common.check_tensor(op, "x2", x2, like=x1, like_name="x1")
    _common.check_tensor(op, "same", same, floating=False)
    _common.check_choice(op, "reduction", reduction, _common.REDUCTIONS)
    if x1.dim() < 1 or x1.shape != x2.shape:
        raise ValueError(
            f"{op}: x1 and x2 must have the same shape [..., D], got {list(x1.shape)} and {list(x2.shape)}"
        )
    if same.shape != x1.shape[:-1]:
        raise ValueError(f"{op}: same must have shape {list(x1.shape[:-1])} (one per pair), got {list(same.shape)}")
    if same.device != x1.device:
        raise ValueError(f"{op}: same is on {same.device} but x1 is on {x1.device}")
    if not (same.dtype == torch.bool or same.is_floating_point()):
        raise TypeError(f"{op}: same must be a bool or floating-point tensor, got {same.dtype}")
    if not isinstance(margin, numbers.Real) or isinstance(margin, bool):
        raise TypeError(f"{op}: margin must be a float, got {type(margin).__name__}")
    work = _common.compute_dtype(x1)
    pairs_shape = x1.shape[:-1]
    pairs = (pairs_shape.numel(), x1.shape[-1])
    loss = _common.call(
        "contrastive_loss",
        x1.to(work).reshape(pairs),
        x2.to(work).reshape(pairs),
        same.to(work).reshape(-1),
        float(margin),
    )
    return formulas.reduce_loss(loss.view(pairs_shape), reduction).to(x1.dtype)


def _check_raw(op, x1, x2, same, *per_pair):
    return _common.check_raw_operands(
        op, ("x1", x1, "MD", None), ("x2", x2, "MD", None), ("same", same, "M", None), *per_pair
    )


@torch.library.register_fake("fastmeta::contrastive_loss")
def _(x1, x2, same, margin):
    _check_raw("contrastive_loss", x1, x2, same)
    return x1.new_empty(x1.shape[0])


@torch.library.register_fake("fastmeta::contrastive_loss_backward")
def _(grad, x1, x2, same, margin):
    _check_raw("contrastive_loss_backward", x1, x2, same, ("grad", grad, "M", None))
    return torch.empty_like(x1), torch.empty_like(x2), torch.empty_like(same)


def _setup_context(ctx, inputs, output):
    x1, x2, same, margin = inputs
    ctx.margin = margin
    ctx.save_for_backward(x1, x2, same)


def _backward(ctx, grad):
    x1, x2, same = ctx.saved_tensors
    g1, g2, gsame = _common.call("contrastive_loss_backward", grad, x1, x2, same, ctx.margin)
    return g1, g2, gsame, None


def _reference_backward(grad, x1, x2, same, margin):
    return _common.reference_vjp(
        lambda x1, x2, same: formulas.contrastive_loss(x1, x2, same, margin, "none"), (x1, x2, same), grad
    )


_common.register_autograd("contrastive_loss", _backward, _setup_context)
_common.register_vmap_over_tasks("contrastive_loss")
_common.register_vmap_over_tasks("contrastive_loss_backward")
_common.register_reference_double_backward("contrastive_loss_backward", _reference_backward)
