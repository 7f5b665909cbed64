import torch

from .. import formulas
from . import _common

__all__ = ["l2o_lstm_step", "l2o_lstm_step_", "l2o_num_weights"]


def l2o_num_weights(num_layers: int, hidden_size: int) -> int:
    """The size of the flat weight vector of an L2O cell."""
    sizes = [4 * hidden_size * ((2 if layer == 0 else hidden_size) + hidden_size + 1) for layer in range(num_layers)]
    return sum(sizes) + hidden_size + 1


def _check(op: str, grad, state, weights):
    _common.check_tensor(op, "grad", grad)
    if grad.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{op}: grad must be float32 or float64, got {grad.dtype}")
    _common.check_tensor(op, "state", state, like=grad, like_name="grad")
    _common.check_tensor(op, "weights", weights, like=grad, like_name="grad")
    if grad.dim() != 1:
        raise ValueError(f"{op}: grad must be a flat [P] tensor, got shape {list(grad.shape)}")
    if state.dim() != 4 or state.shape[1] != 2 or state.shape[0] < 1:
        raise ValueError(f"{op}: state must have shape [num_layers, 2, hidden_size, P], got {list(state.shape)}")
    if state.shape[3] != grad.shape[0]:
        raise ValueError(
            f"{op}: state is for P = {state.shape[3]} coordinates but grad has "
            f"P = {grad.shape[0]}; each parameter needs its own state"
        )
    expected = l2o_num_weights(state.shape[0], state.shape[2])
    if weights.shape != (expected,):
        raise ValueError(
            f"{op}: weights must be a flat tensor of {expected} values for the "
            f"state's num_layers = {state.shape[0]} and hidden_size = {state.shape[2]} "
            f"(state of shape {list(state.shape)}), got shape {list(weights.shape)}; "
            "are the state and the weights from the same LSTM?"
        )


def l2o_lstm_step(
    grad: torch.Tensor,
    state: torch.Tensor,
    weights: torch.Tensor,
    preprocess_p: float = 10.0,
    output_scale: float = 0.1,
):
    """One step of the coordinatewise LSTM optimizer (Andrychowicz et al. 2016).

    Every coordinate's gradient goes through log-sign preprocessing, ``L``
    LSTM layers of ``H`` units (``nn.LSTMCell``'s equations and gate order)
    and a linear head; the update is the head's output times ``output_scale``.

    Args:
        grad: the optimizee's gradient, ``[P]``.
        state: h and c of every layer, coordinates last: ``[L, 2, H, P]``.
        weights: the shared weights as one flat vector; build it from
            ``nn.LSTMCell`` and ``nn.Linear`` modules with
            ``fastmeta.nn.CoordinatewiseLSTM.flat_weights()``.
        preprocess_p: the preprocessing constant p.
        output_scale: multiplies the head's output.

    Returns:
        ``(update [P], new_state [L, 2, H, P])``, differentiable with respect to
        grad, state and weights.
    """
    _check("l2o_lstm_step", grad, state, weights)
    return _common.call("l2o_lstm_step", grad, state, weights, float(preprocess_p), float(output_scale))


def l2o_lstm_step_(
    param: torch.Tensor,
    grad: torch.Tensor,
    state: torch.Tensor,
    weights: torch.Tensor,
    preprocess_p: float = 10.0,
    output_scale: float = 0.1,
):
    """``l2o_lstm_step`` applied in place, without autograd: ``param += update``
    and ``state`` is overwritten by the new state, in one pass over the
    coordinates. param ``[P]`` and state must be contiguous."""
    op = "l2o_lstm_step_"
    _check(op, grad, state, weights)
    _common.check_tensor(op, "param", param, like=grad, like_name="grad")
    if param.shape != grad.shape:
        raise ValueError(f"{op}: param has shape {list(param.shape)} but grad has {list(grad.shape)}")
    if not (param.is_contiguous() and state.is_contiguous()):
        raise ValueError(f"{op}: param and state must be contiguous, since they are updated in place")
    with torch.no_grad():
        _common.call("l2o_lstm_step_", param, grad, state, weights, float(preprocess_p), float(output_scale))


def _check_raw(op, grad, state, weights, preprocess_p, *others):
    torch._check(
        grad.dtype in (torch.float32, torch.float64),
        lambda: f"fastmeta::{op}: grad must be a float32 or float64 tensor, got {grad.dtype}",
    )
    size = _common.check_raw_operands(
        op, ("grad", grad, "P", None), ("state", state, "L2HP", None), ("weights", weights, "W", None), *others
    )
    torch._check(
        size["L"] >= 1 and size["H"] >= 1,
        lambda: f"fastmeta::{op}: state must have shape [num_layers, 2, hidden_size, P], got {list(state.shape)}",
    )
    expected = l2o_num_weights(size["L"], size["H"])
    torch._check(
        size["W"] == expected,
        lambda: (
            f"fastmeta::{op}: a state of shape {list(state.shape)} needs {expected} "
            f"weights, but weights has {size['W']}; are the state and the weights from "
            "the same LSTM?"
        ),
    )
    torch._check(preprocess_p > 0, lambda: f"fastmeta::{op}: preprocess_p must be positive")


@torch.library.register_fake("fastmeta::l2o_lstm_step")
def _(grad, state, weights, preprocess_p, output_scale):
    _check_raw("l2o_lstm_step", grad, state, weights, preprocess_p)
    return torch.empty_like(grad), torch.empty_like(state)


@torch.library.register_fake("fastmeta::l2o_lstm_step_")
def _(param, grad, state, weights, preprocess_p, output_scale):
    _check_raw("l2o_lstm_step_", grad, state, weights, preprocess_p, ("param", param, "P", None))
    return None


@torch.library.register_fake("fastmeta::l2o_lstm_step_backward")
def _(grad_update, grad_state, grad, state, weights, preprocess_p, output_scale):
    _check_raw(
        "l2o_lstm_step_backward",
        grad,
        state,
        weights,
        preprocess_p,
        ("grad_update", grad_update, "P", None),
        ("grad_state", grad_state, "L2HP", None),
    )
    return torch.empty_like(grad), torch.empty_like(state), torch.empty_like(weights)


def _setup_context(ctx, inputs, output):
    grad, state, weights, preprocess_p, output_scale = inputs
    ctx.constants = (preprocess_p, output_scale)
    ctx.save_for_backward(grad, state, weights)


def _backward(ctx, grad_update, grad_state):
    grad, state, weights = ctx.saved_tensors
    grad_update = torch.zeros_like(grad) if grad_update is None else grad_update
    grad_state = torch.zeros_like(state) if grad_state is None else grad_state
    d_grad, d_state, d_weights = _common.call(
        "l2o_lstm_step_backward", grad_update, grad_state, grad, state, weights, *ctx.constants
    )
    return d_grad, d_state, d_weights, None, None


def _reference_backward(grad_update, grad_state, grad, state, weights, preprocess_p, output_scale):
    primals = (grad, state, weights)

    def outputs(grad, state, weights):
        update, new_state = formulas.l2o_lstm_step(grad, state, weights, preprocess_p, output_scale)
        return torch.cat([update, new_state.reshape(-1)])

    return _common.reference_vjp(outputs, primals, torch.cat([grad_update, grad_state.reshape(-1)]))


_common.register_autograd("l2o_lstm_step", _backward, _setup_context)
_common.register_reference_double_backward("l2o_lstm_step_backward", _reference_backward)
