import numbers

import torch

from . import _common

__all__ = ["class_prototypes"]


def class_prototypes(support: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Per-class means of the support embeddings (Prototypical networks).

    ``c_k = (1 / |S_k|) sum_{i: labels_i = k} support_i``.

    Args:
        support: embeddings ``[B, S, D]`` or ``[S, D]``.
        labels: int64 class of each support example, ``[B, S]`` or ``[S]``, in
            ``[0, num_classes)``.
        num_classes: N, the number of classes; each must have a support example.

    Returns:
        Prototypes ``[B, N, D]`` (or ``[N, D]``).

    Example:
        >>> protos = fastmeta.ops.class_prototypes(torch.randn(10, 4), torch.arange(10) % 5, 5)
        >>> protos.shape
        torch.Size([5, 4])
    """
    op = "class_prototypes"
    _common.check_tensor(op, "support", support)
    _common.check_tensor(op, "labels", labels, floating=False)
    if labels.dtype != torch.int64:
        raise TypeError(f"{op}: labels must have dtype torch.int64, got {labels.dtype}")
    if labels.device != support.device:
        raise ValueError(f"{op}: labels is on {labels.device} but support is on {support.device}")
    if support.dim() not in (2, 3) or labels.shape != support.shape[:-1]:
        raise ValueError(
            f"{op}: support must be [B, S, D] or [S, D] and labels [B, S] or [S]; got "
            f"support of shape {tuple(support.shape)} and labels of shape {tuple(labels.shape)}"
        )
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 0:
        raise ValueError(f"{op}: num_classes must be a non-negative int, got {num_classes!r}")
    num_classes = int(num_classes)
    unbatched = support.dim() == 2
    dtype = support.dtype
    s = support.to(_common.compute_dtype(support))
    if unbatched:
        s, labels = s.unsqueeze(0), labels.unsqueeze(0)
    out = _common.call("class_prototypes", s, labels, num_classes)
    return (out.squeeze(0) if unbatched else out).to(dtype)


@torch.library.register_fake("fastmeta::class_prototypes")
def _(support, labels, num_classes):
    op = "class_prototypes"
    size = _common.check_raw_operands(op, ("support", support, "BSD", None), ("labels", labels, "BS", torch.int64))
    torch._check(num_classes >= 0, lambda: f"fastmeta::{op}: num_classes must be >= 0, got {num_classes}")
    return support.new_empty(size["B"], num_classes, size["D"])


@torch.library.register_fake("fastmeta::class_prototypes_backward")
def _(grad, labels):
    size = _common.check_raw_operands(
        "class_prototypes_backward", ("grad", grad, "BND", None), ("labels", labels, "BS", torch.int64)
    )
    return grad.new_empty(size["B"], size["S"], size["D"])


def _setup_context(ctx, inputs, output):
    _, labels, _ = inputs
    ctx.save_for_backward(labels)


def _backward(ctx, grad):
    (labels,) = ctx.saved_tensors
    return _common.call("class_prototypes_backward", grad, labels), None, None


_common.register_autograd("class_prototypes", _backward, _setup_context)
_common.register_vmap_over_tasks("class_prototypes")
_common.register_vmap_over_tasks("class_prototypes_backward")


# class_prototypes_backward is linear in grad, and its adjoint is class_prototypes.
def _setup_context_backward(ctx, inputs, output):
    grad, labels = inputs
    ctx.num_classes = grad.shape[1]
    ctx.save_for_backward(labels)


def _backward_backward(ctx, grad_grad_support):
    (labels,) = ctx.saved_tensors
    return _common.call("class_prototypes", grad_grad_support, labels, ctx.num_classes), None


_common.register_autograd("class_prototypes_backward", _backward_backward, _setup_context_backward)
