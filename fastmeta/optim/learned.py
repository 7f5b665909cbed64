"""Applying and meta-training the coordinatewise LSTM optimizer."""

from typing import Callable, Iterator, Sequence, Union

import torch

from .. import ops
from ..nn import CoordinatewiseLSTM


class LearnedOptimizer(torch.optim.Optimizer):
    """A ``torch.optim.Optimizer`` that applies a trained
    ``fastmeta.nn.CoordinatewiseLSTM`` with the fused in-place kernel: each
    ``step()`` adds the LSTM's update to every parameter that has a gradient
    and advances that parameter's LSTM state (kept in ``optimizer.state``, so
    ``state_dict()`` / ``load_state_dict()`` carry it).

    Example:
        >>> opt = fastmeta.optim.LearnedOptimizer(model.parameters(), lstm)
        >>> loss.backward(); opt.step(); opt.zero_grad()
    """

    def __init__(self, params, lstm: CoordinatewiseLSTM):
        if not isinstance(lstm, CoordinatewiseLSTM):
            raise TypeError(
                f"LearnedOptimizer: lstm must be a fastmeta.nn.CoordinatewiseLSTM, got {type(lstm).__name__}"
            )
        super().__init__(params, {})
        self.lstm = lstm

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        weights = {}
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                if param.grad.is_sparse:
                    raise RuntimeError("LearnedOptimizer does not support sparse gradients")
                if param.dtype not in (torch.float32, torch.float64):
                    raise TypeError(
                        f"LearnedOptimizer: a parameter has dtype {param.dtype}; the "
                        "coordinatewise LSTM kernels take float32 and float64 parameters"
                    )
                key = (param.dtype, param.device)
                if key not in weights:
                    weights[key] = self.lstm.flat_weights().detach().to(param.device, param.dtype)
                state = self.state[param]
                if "lstm_state" not in state:
                    state["lstm_state"] = self.lstm.initial_state(param.detach())
                target = param if param.is_contiguous() else param.contiguous()
                ops.l2o_lstm_step_(
                    target.view(-1),
                    param.grad.reshape(-1).to(param.dtype),
                    state["lstm_state"],
                    weights[key],
                    self.lstm.preprocess_p,
                    self.lstm.output_scale,
                )
                if target is not param:
                    param.copy_(target)
        return loss


Params = Union[torch.Tensor, Sequence[torch.Tensor]]


def truncated_unrolls(
    lstm: CoordinatewiseLSTM, loss_fn: Callable[..., torch.Tensor], params: Params, horizon: int = 100, unroll: int = 20
) -> Iterator[torch.Tensor]:
    """Meta-training of a coordinatewise LSTM by truncated backpropagation
    through the optimization (Andrychowicz et al. 2016).

    Optimizes ``loss_fn(*params)`` for ``horizon`` steps with ``lstm``, and
    yields, after every ``unroll`` steps, the meta-loss: the sum of the
    optimizee's losses over those steps, differentiable with respect to the
    LSTM's weights. The optimizee's gradients are detached (no second
    derivatives), and the parameters and LSTM state are detached between
    unrolls. ``params`` are the starting values (a tensor or a sequence of
    tensors; not modified).

    Example:
        >>> meta_opt = torch.optim.Adam(lstm.parameters(), 1e-3)
        >>> for meta_loss in truncated_unrolls(lstm, f, theta0):
        ...     meta_opt.zero_grad(); meta_loss.backward(); meta_opt.step()
    """
    params = [params] if isinstance(params, torch.Tensor) else list(params)
    if horizon < 1 or unroll < 1:
        raise ValueError(f"truncated_unrolls: horizon and unroll must be positive, got {horizon} and {unroll}")
    sizes = [p.numel() for p in params]
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    state = None
    for start in range(0, horizon, unroll):
        flat = flat.detach().requires_grad_()
        state = None if state is None else state.detach()
        meta_loss = flat.new_zeros(())
        for _ in range(min(unroll, horizon - start)):
            views = [v.view(p.shape) for v, p in zip(flat.split(sizes), params)]
            loss = loss_fn(*views)
            (grad,) = torch.autograd.grad(loss, flat, retain_graph=True)
            update, state = lstm(grad.detach(), state)
            flat = flat + update
            meta_loss = meta_loss + loss
        yield meta_loss
