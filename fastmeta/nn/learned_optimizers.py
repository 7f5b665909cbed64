"""Learned optimizers: the coordinatewise LSTM of Andrychowicz et al. (2016)
and the LSTM meta-learner of Ravi & Larochelle (2017)."""

from typing import Callable, Dict, Optional, Tuple

import torch
from torch import nn

from .. import ops


class CoordinatewiseLSTM(nn.Module):
    """The L2O optimizer: one small LSTM, weights shared, run on every
    coordinate of the optimizee's gradient (Andrychowicz et al. 2016).

    Its weights are plain PyTorch modules, so they move to and from code that
    runs ``nn.LSTMCell`` over P rows: ``.cells`` (an ``nn.ModuleList`` of
    ``nn.LSTMCell``, the first with input size 2 for the log-sign features) and
    ``.head`` (``nn.Linear(hidden_size, 1)``).

    ``update, state = lstm(grad, state)`` takes a gradient of any shape and
    returns the update to add to the parameter (same shape) and the new state,
    a ``[num_layers, 2, hidden_size, grad.numel()]`` tensor (``state=None``
    starts from zeros). It is differentiable with respect to the weights, the
    state and the gradient, through fused CPU and CUDA kernels.

    Example:
        >>> lstm = fastmeta.nn.CoordinatewiseLSTM()
        >>> update, state = lstm(theta.grad)
        >>> theta = theta + update
    """

    def __init__(
        self, hidden_size: int = 20, num_layers: int = 2, preprocess_p: float = 10.0, output_scale: float = 0.1
    ):
        super().__init__()
        if num_layers < 1 or hidden_size < 1:
            raise ValueError(
                f"CoordinatewiseLSTM: num_layers and hidden_size must be positive, got {num_layers} and {hidden_size}"
            )
        self.hidden_size, self.num_layers = hidden_size, num_layers
        self.preprocess_p, self.output_scale = float(preprocess_p), float(output_scale)
        self.cells = nn.ModuleList(
            nn.LSTMCell(2 if layer == 0 else hidden_size, hidden_size) for layer in range(num_layers)
        )
        self.head = nn.Linear(hidden_size, 1)

    def flat_weights(self) -> torch.Tensor:
        """The weights in the layout of ``fastmeta.ops.l2o_lstm_step`` (differentiable)."""
        parts = []
        for cell in self.cells:
            parts += [torch.cat([cell.weight_ih, cell.weight_hh], 1).reshape(-1), cell.bias_ih + cell.bias_hh]
        parts += [self.head.weight.reshape(-1), self.head.bias]
        return torch.cat(parts)

    def initial_state(self, grad: torch.Tensor) -> torch.Tensor:
        return grad.new_zeros(self.num_layers, 2, self.hidden_size, grad.numel())

    def forward(self, grad: torch.Tensor, state: Optional[torch.Tensor] = None):
        flat = _flat(grad, "CoordinatewiseLSTM")
        weights = self.flat_weights()
        if flat.dtype != weights.dtype:
            raise TypeError(
                f"CoordinatewiseLSTM: grad has dtype {grad.dtype} but the LSTM's weights "
                f"are {weights.dtype}; convert one of them (e.g. lstm.to({grad.dtype}))"
            )
        if state is None:
            state = self.initial_state(grad)
        own = (self.num_layers, self.hidden_size)
        if isinstance(state, torch.Tensor) and state.dim() == 4 and (state.shape[0], state.shape[2]) != own:
            raise ValueError(
                f"CoordinatewiseLSTM: state has shape {list(state.shape)}, the state of "
                f"an LSTM with num_layers = {state.shape[0]} and hidden_size = "
                f"{state.shape[2]}, but this one has num_layers = {own[0]} and "
                f"hidden_size = {own[1]}"
            )
        update, state = ops.l2o_lstm_step(flat, state, weights, self.preprocess_p, self.output_scale)
        return update.view(grad.shape), state

    def extra_repr(self) -> str:
        return (
            f"hidden_size={self.hidden_size}, num_layers={self.num_layers}, "
            f"preprocess_p={self.preprocess_p}, output_scale={self.output_scale}"
        )


def _flat(t, owner: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{owner}: expected a tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{owner}: gradients must be floating-point tensors, got dtype {t.dtype}")
    return t.reshape(-1)


class MetaLearnerLSTM(nn.Module):
    """The LSTM meta-learner of Ravi & Larochelle (2017).

    A learner's parameters, flattened to ``theta`` (``[P]``), are the cell
    state of an LSTM-like update run on every coordinate:
    ``theta_t = f_t * theta_{t-1} - i_t * grad_t``, where the forget gate
    ``f_t = sigmoid(w_f . [h_t, theta_{t-1}, f_{t-1}] + b_f)`` and the input
    gate ``i_t`` (likewise) read ``h_t``, the output of an ``nn.LSTMCell`` (``.lstm``)
    over the preprocessed gradient and loss. The learner's initial parameters
    are learned too (``.initial_params``, the initial cell state), the forget
    bias starts high (in [4, 6]) and the input bias low (in [-5, -4]), as in
    the paper.

    Meta-training: ``adapted = meta.adapt(learner, x, y, loss_fn, steps)`` runs
    ``steps`` updates on a support set and returns the adapted parameters as a
    dict for ``torch.func.functional_call(learner, adapted, x_query)``; the
    query loss is differentiable with respect to the meta-learner's parameters
    (the learner's gradients and losses are its inputs and are detached, as in
    the paper).

    Example:
        >>> meta = fastmeta.nn.MetaLearnerLSTM(learner)
        >>> params = meta.adapt(learner, x_support, y_support, F.cross_entropy, steps=5)
        >>> loss = F.cross_entropy(torch.func.functional_call(learner, params, x_query), y_query)
        >>> loss.backward()  # gradients for meta.parameters()
    """

    def __init__(self, learner: nn.Module, hidden_size: int = 20, preprocess_p: float = 10.0):
        super().__init__()
        named = [(name, p) for name, p in learner.named_parameters()]
        if not named:
            raise ValueError("MetaLearnerLSTM: the learner has no parameters")
        self.hidden_size, self.preprocess_p = hidden_size, float(preprocess_p)
        self.param_shapes: Dict[str, torch.Size] = {name: p.shape for name, p in named}
        self.lstm = nn.LSTMCell(4, hidden_size)
        self.forget_weight = nn.Parameter(torch.empty(hidden_size + 2).uniform_(-0.01, 0.01))
        self.forget_bias = nn.Parameter(torch.empty(1).uniform_(4, 6))
        self.input_weight = nn.Parameter(torch.empty(hidden_size + 2).uniform_(-0.01, 0.01))
        self.input_bias = nn.Parameter(torch.empty(1).uniform_(-5, -4))
        self.initial_params = nn.Parameter(torch.cat([p.detach().reshape(-1) for _, p in named]).clone())

    def flat_weights(self) -> torch.Tensor:
        """The weights in the layout of ``fastmeta.ops.meta_lstm_step`` (differentiable)."""
        cell = self.lstm
        return torch.cat(
            [
                torch.cat([cell.weight_ih, cell.weight_hh], 1).reshape(-1),
                cell.bias_ih + cell.bias_hh,
                self.forget_weight,
                self.forget_bias,
                self.input_weight,
                self.input_bias,
            ]
        )

    def initial_state(self, theta: torch.Tensor) -> torch.Tensor:
        return theta.new_zeros(2 * self.hidden_size + 2, theta.numel())

    def forward(
        self, grad: torch.Tensor, loss: torch.Tensor, theta: torch.Tensor, state: Optional[torch.Tensor] = None
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """One update: ``theta, state = meta(grad, loss, theta, state)`` for flat ``[P]``
        grad and theta and a scalar loss."""
        if state is None:
            state = self.initial_state(theta)
        return ops.meta_lstm_step(
            _flat(grad, "MetaLearnerLSTM"), loss.reshape(()), theta, state, self.flat_weights(), self.preprocess_p
        )

    def unflatten(self, theta: torch.Tensor) -> Dict[str, torch.Tensor]:
        """The learner's parameters as a dict of views of the flat ``theta``."""
        out, offset = {}, 0
        for name, shape in self.param_shapes.items():
            n = shape.numel()
            out[name] = theta[offset : offset + n].view(shape)
            offset += n
        return out

    def adapt(
        self,
        learner: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        steps: int,
        batch_size: Optional[int] = None,
    ) -> Dict[str, torch.Tensor]:
        """Adapts ``learner`` to the support set (x, y) with ``steps`` updates
        (on minibatches of ``batch_size`` when given) starting from
        ``initial_params``; returns the adapted parameters (a dict)."""
        theta, state = self.initial_params, None
        for step in range(steps):
            if batch_size is None:
                xb, yb = x, y
            else:
                index = torch.randint(0, x.shape[0], (batch_size,), device=x.device)
                xb, yb = x[index], y[index]
            probe = theta.detach().requires_grad_()
            loss = loss_fn(torch.func.functional_call(learner, self.unflatten(probe), (xb,)), yb)
            (grad,) = torch.autograd.grad(loss, probe)
            theta, state = self(grad, loss.detach(), theta, state)
        return self.unflatten(theta)
