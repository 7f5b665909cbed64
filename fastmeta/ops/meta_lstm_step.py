import torch

from .. import formulas
from . import _common

__all__ = ["meta_lstm_step", "meta_lstm_num_weights"]


def meta_lstm_num_weights(hidden_size: int) -> int:
    """The size of the flat weight vector of a Ravi & Larochelle meta-learner cell."""
    return 4 * hidden_size * (4 + hidden_size + 1) + 2 * (hidden_size + 3)


def meta_lstm_step(
    grad: torch.Tensor,
    loss: torch.Tensor,
    theta: torch.Tensor,
    state: torch.Tensor,
    weights: torch.Tensor,
    preprocess_p: float = 10.0,
):
    """One step of the LSTM meta-learner (Ravi & Larochelle 2017).

    Per coordinate: an LSTM layer of ``H`` units over the preprocessed gradient
    and loss, then the forget and input gates
    ``f = sigmoid(w_f . [h, theta_prev, f_prev] + b_f)`` (``i`` likewise) and
    the parameter update ``theta = f * theta_prev - i * grad``.

    Args:
        grad: the learner's gradient, ``[P]``.
        loss: the learner's loss, a 0-dimensional tensor.
        theta: the learner's parameters (the cell state of the paper), ``[P]``.
        state: ``[2H + 2, P]``: h, c, then the previous f and i.
        weights: the shared weights as one flat vector
            (``fastmeta.nn.MetaLearnerLSTM.flat_weights()``).
        preprocess_p: the preprocessing constant p.

    Returns:
        ``(theta [P], new_state [2H + 2, P])``, differentiable with respect to
        every tensor argument.
    """
    op = "meta_lstm_step"
    _common.check_tensor(op, "grad", grad)
    if grad.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{op}: grad must be float32 or float64, got {grad.dtype}")
    for name, t in (("loss", loss), ("theta", theta), ("state", state), ("weights", weights)):
        _common.check_tensor(op, name, t, like=grad, like_name="grad")
    if grad.dim() != 1 or theta.shape != grad.shape:
        raise ValueError(
            f"{op}: grad and theta must be flat [P] tensors of the same size, got "
            f"{list(grad.shape)} and {list(theta.shape)}"
        )
    if loss.dim() != 0:
        raise ValueError(f"{op}: loss must be a 0-dimensional tensor, got shape {list(loss.shape)}")
    if state.dim() != 2 or state.shape[0] < 2 or state.shape[0] % 2:
        raise ValueError(f"{op}: state must have shape [2 * hidden_size + 2, P], got {list(state.shape)}")
    if state.shape[1] != grad.shape[0]:
        raise ValueError(f"{op}: state is for P = {state.shape[1]} coordinates but grad has P = {grad.shape[0]}")
    hidden = state.shape[0] // 2 - 1
    expected = meta_lstm_num_weights(hidden)
    if weights.shape != (expected,):
        raise ValueError(
            f"{op}: weights must be a flat tensor of {expected} values for "
            f"hidden_size = {hidden}; got shape {list(weights.shape)}"
        )
    return _common.call("meta_lstm_step", grad, loss, theta, state, weights, float(preprocess_p))


def _check_raw(op, grad, loss, theta, state, weights, preprocess_p, *others):
    torch._check(
        grad.dtype in (torch.float32, torch.float64),
        lambda: f"fastmeta::{op}: grad must be a float32 or float64 tensor, got {grad.dtype}",
    )
    size = _common.check_raw_operands(
        op,
        ("grad", grad, "P", None),
        ("loss", loss, "", None),
        ("theta", theta, "P", None),
        ("state", state, "SP", None),
        ("weights", weights, "W", None),
        *others,
    )
    torch._check(
        size["S"] >= 4 and size["S"] % 2 == 0,
        lambda: f"fastmeta::{op}: state must have shape [2 * hidden_size + 2, P], got {list(state.shape)}",
    )
    expected = meta_lstm_num_weights(size["S"] // 2 - 1)
    torch._check(
        size["W"] == expected,
        lambda: (
            f"fastmeta::{op}: a state of shape {list(state.shape)} needs {expected} "
            f"weights, but weights has {size['W']}; are the state and the weights from "
            "the same meta-learner?"
        ),
    )
    torch._check(preprocess_p > 0, lambda: f"fastmeta::{op}: preprocess_p must be positive")


@torch.library.register_fake("fastmeta::meta_lstm_step")
def _(grad, loss, theta, state, weights, preprocess_p):
    _check_raw("meta_lstm_step", grad, loss, theta, state, weights, preprocess_p)
    return torch.empty_like(theta), torch.empty_like(state)


@torch.library.register_fake("fastmeta::meta_lstm_step_backward")
def _(grad_theta, grad_state, grad, loss, theta, state, weights, preprocess_p):
    _check_raw(
        "meta_lstm_step_backward",
        grad,
        loss,
        theta,
        state,
        weights,
        preprocess_p,
        ("grad_theta", grad_theta, "P", None),
        ("grad_state", grad_state, "SP", None),
    )
    return (
        torch.empty_like(grad),
        torch.empty_like(loss),
        torch.empty_like(theta),
        torch.empty_like(state),
        torch.empty_like(weights),
    )


def _setup_context(ctx, inputs, output):
    *tensors, ctx.preprocess_p = inputs
    ctx.save_for_backward(*tensors)


def _backward(ctx, grad_theta, grad_state):
    grad, loss, theta, state, weights = ctx.saved_tensors
    grad_theta = torch.zeros_like(theta) if grad_theta is None else grad_theta
    grad_state = torch.zeros_like(state) if grad_state is None else grad_state
    grads = _common.call(
        "meta_lstm_step_backward", grad_theta, grad_state, grad, loss, theta, state, weights, ctx.preprocess_p
    )
    return (*grads, None)


def _reference_backward(grad_theta, grad_state, grad, loss, theta, state, weights, preprocess_p):
    def outputs(grad, loss, theta, state, weights):
        new_theta, new_state = formulas.meta_lstm_step(grad, loss, theta, state, weights, preprocess_p)
        return torch.cat([new_theta, new_state.reshape(-1)])

    return _common.reference_vjp(
        outputs, (grad, loss, theta, state, weights), torch.cat([grad_theta, grad_state.reshape(-1)])
    )


_common.register_autograd("meta_lstm_step", _backward, _setup_context)
_common.register_reference_double_backward("meta_lstm_step_backward", _reference_backward)
