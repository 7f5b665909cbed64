from typing import Optional, Sequence

import torch

from . import _common

__all__ = ["mlp_task_derivatives", "MLP_ACTIVATIONS", "MLP_LOSSES"]

MLP_ACTIVATIONS = ("identity", "relu", "tanh", "sigmoid", "elu")
MLP_LOSSES = ("mse", "cross_entropy")


def mlp_task_derivatives(
    params: torch.Tensor,
    x: torch.Tensor,
    target: torch.Tensor,
    direction: Optional[torch.Tensor] = None,
    *,
    widths: Sequence[int],
    activations: Sequence[str],
    loss: str = "mse",
    input_grad: bool = False,
):
    """Per-task loss, gradient and Hessian-vector product of an MLP learner.

    The learner has ``len(widths) - 1`` linear layers (``widths[l]`` inputs,
    ``widths[l + 1]`` outputs), layer ``l`` followed by ``activations[l]``
    (one of ``MLP_ACTIVATIONS``; ``"elu"`` with alpha 1). Each task's
    parameters are one flat vector: per layer the weight ``[out, in]``
    (row-major, as ``nn.Linear.weight``), then the bias.

    Args:
        params: ``[T, P]`` per-task parameters.
        x: ``[T, N, widths[0]]`` inputs.
        target: ``[T, N, widths[-1]]`` regression targets (``loss="mse"``,
            the mean over points and outputs) or ``[T, N]`` int64 class labels
            (``loss="cross_entropy"``, the mean over points).
        direction: ``[T, P]``, the vector of the Hessian-vector product, or None.
        input_grad: also differentiate with respect to ``x``.

    Returns:
        ``(loss [T], grad [T, P], grad_input, hvp, hvp_input)``: ``grad_input``
        is d loss / d x ``[T, N, widths[0]]`` (with ``input_grad``), ``hvp``
        is H direction ``[T, P]`` (with ``direction``) and ``hvp_input`` is
        (d^2 loss / d x d params) direction (with both). Outputs not asked for
        have 0 tasks. The outputs are not differentiable: this op is what the
        meta-gradient engine (``fastmeta.functional.maml_query_loss``) calls.
    """
    op = "mlp_task_derivatives"
    _common.check_tensor(op, "params", params)
    _common.check_tensor(op, "x", x, like=params, like_name="params")
    _common.check_choice(op, "loss", loss, MLP_LOSSES)
    for f in activations:
        _common.check_choice(op, "activation", f, MLP_ACTIVATIONS)
    if direction is not None:
        _common.check_tensor(op, "direction", direction, like=params, like_name="params")
    return _common.call(
        "mlp_task_derivatives", params, x, target, direction, list(widths), list(activations), loss, input_grad
    )


@torch.library.register_fake("fastmeta::mlp_task_derivatives")
def _(params, x, target, direction, widths, activations, loss, input_grad):
    op = "mlp_task_derivatives"
    torch._check(
        params.dtype in (torch.float32, torch.float64),
        lambda: f"fastmeta::{op}: params must be float32 or float64, got {params.dtype}",
    )
    torch._check(
        1 <= len(widths) - 1 <= 8 and len(activations) == len(widths) - 1 and all(w >= 1 for w in widths),
        lambda: (
            f"fastmeta::{op}: the learner must have 1 to 8 linear layers of positive "
            f"widths, each with an activation; got widths {list(widths)} and "
            f"activations {list(activations)}"
        ),
    )
    torch._check(
        all(f in MLP_ACTIVATIONS for f in activations) and loss in MLP_LOSSES,
        lambda: (
            f"fastmeta::{op}: activations must be among {MLP_ACTIVATIONS} and loss "
            f"among {MLP_LOSSES}; got {list(activations)} and {loss!r}"
        ),
    )
    num_params = sum(n_out * (n_in + 1) for n_in, n_out in zip(widths[:-1], widths[1:]))
    operands = [("params", params, "TP", None), ("x", x, "TNI", None)]
    operands.append(("target", target, "TNC", None) if loss == "mse" else ("target", target, "TN", torch.int64))
    if direction is not None:
        operands.append(("direction", direction, "TP", None))
    size = _common.check_raw_operands(op, *operands)
    torch._check(
        size["P"] == num_params and size["I"] == widths[0] and size.get("C", widths[-1]) == widths[-1],
        lambda: (
            f"fastmeta::{op}: params, x and target must fit a learner of widths "
            f"{list(widths)} ({num_params} parameters); got shapes {list(params.shape)}, "
            f"{list(x.shape)} and {list(target.shape)}"
        ),
    )
    T, P = params.shape
    tasks_x = T if input_grad else 0
    with_direction = direction is not None
    return (
        params.new_empty(T),
        params.new_empty(T, P),
        x.new_empty(tasks_x, *x.shape[1:]),
        params.new_empty(T if with_direction else 0, P),
        x.new_empty(tasks_x if with_direction else 0, *x.shape[1:]),
    )
