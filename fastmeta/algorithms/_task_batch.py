"""What the batched algorithms share: the checks of a meta-batch's tensors,
the adaptation of all its tasks at once, and the output a training loop
reads."""

import functools
import numbers
from typing import Dict, NamedTuple, Optional

import torch
from torch import nn

from .. import _build_config
from .engine import (
    Loss,
    batch_statistics,
    call_with_parameters,
    convolution_weights,
    flat_to_dict,
    loss_function,
    mlp_derivatives,
    mlp_structure,
    module_derivatives,
    one_task_at_a_time,
    tracking_batch_norms,
)

__all__ = ["MetaBatchOutput"]


class MetaBatchOutput(NamedTuple):
    """What a classifier's training loop needs of one meta-batch."""

    loss: torch.Tensor  # the mean query loss over tasks (differentiable)
    outputs: torch.Tensor  # the adapted learners' query outputs [T, Q, ...] (no gradient)
    accuracy: Optional[torch.Tensor]  # query accuracy with a cross-entropy loss, else None


def check_tasks(name: str, device: torch.device, **tensors: torch.Tensor):
    """All tensors are [T, N, ...] with the same T > 0, on the module's
    device, and the support and query sets are not empty."""
    for key, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: {key} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() < 2:
            raise ValueError(f"{name}: {key} must be [T, N, ...] (tasks, points), got shape {list(t.shape)}")
        if t.device != device:
            raise ValueError(
                f"{name}: {key} is on {t.device} but the module's parameters are on "
                f"{device}; move them to the same device"
            )
    counts = {key: t.shape[0] for key, t in tensors.items()}
    if len(set(counts.values())) > 1:
        raise ValueError(
            f"{name}: the number of tasks differs between " + ", ".join(f"{k} ({v})" for k, v in counts.items())
        )
    if 0 in counts.values():
        raise ValueError(f"{name}: there are no tasks (T = 0); pass at least one task")
    for key, what in (("x_support", "support"), ("x_query", "query")):
        if key in tensors and tensors[key].shape[1] == 0:
            raise ValueError(f"{name}: the {what} set is empty ({key} has 0 points per task)")


def check_steps(name: str, steps) -> int:
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 0:
        raise ValueError(f"{name}: the number of inner steps must be an int >= 0, got {steps!r}")
    return int(steps)


class TaskBatchLearner(nn.Module):
    """What BatchedMAML and Reptile share: the learner as flat parameters,
    the choice of derivatives (fused MLP kernels or torch.func), and per-task
    adaptation for evaluation."""

    def __init__(self, module: nn.Module, inner_steps: int, loss: Loss):
        super().__init__()
        name = type(self).__name__
        if not isinstance(module, nn.Module):
            raise TypeError(f"{name}: module must be an nn.Module, got {type(module).__name__}")
        if not any(True for _ in module.parameters()):
            raise ValueError(f"{name}: the module has no parameters to adapt")
        self.module = module
        self.inner_steps = check_steps(name, inner_steps)
        self.loss = loss
        loss_function(loss)  # rejects unknown loss names
        self._fused_cache = None

    def _fused_derivatives(self):
        """The fused kernels' derivatives function, or None where they would
        not reproduce the module exactly. Checked at every call, since hooks
        and parametrizations can be added to the module at any time."""
        mlp = None if callable(self.loss) else mlp_structure(self.module)
        if mlp is None:
            return None
        key = (tuple(mlp[0]), tuple(mlp[1]))
        if self._fused_cache is None or self._fused_cache[0] != key:
            self._fused_cache = (key, mlp_derivatives(*mlp, self.loss))
        return self._fused_cache[1]

    @property
    def fused(self) -> bool:
        """Whether the learner is an MLP the fused kernels compute exactly
        (with this loss): exactly ``nn.Linear`` layers and supported
        activations, without hooks, parametrizations or tied weights."""
        return self._fused_derivatives() is not None

    def _runs_fused(self, derivatives) -> bool:
        """Whether ``derivatives`` (from :meth:`derivatives`) are the fused kernels'."""
        return self._fused_cache is not None and derivatives is self._fused_cache[1]

    MEMORY_POLICIES = ("auto", "keep", "recompute")

    def _check_memory(self, memory: str) -> str:
        if memory not in self.MEMORY_POLICIES:
            raise ValueError(
                f"{type(self).__name__}: unknown memory policy {memory!r}; expected "
                "one of " + ", ".join(map(repr, self.MEMORY_POLICIES))
            )
        return memory

    def _keeps_graphs(self, derivatives, device: torch.device) -> bool:
        """Whether this call takes the generic path with the ``"keep"``
        policy (``self.memory``, BatchedMAML and iMAML)."""
        if self._runs_fused(derivatives):
            return False
        return self.memory == "keep" or (self.memory == "auto" and one_task_at_a_time(self.module, device))

    def derivatives(self, x: torch.Tensor, dtype: torch.dtype):
        """The derivatives function for inputs ``x`` and parameters of
        ``dtype``: the fused kernels where they support the learner."""
        fused = self._fused_derivatives()
        on_fused_device = x.device.type == "cpu" or (x.device.type == "cuda" and _build_config.WITH_CUDA)
        if fused is not None and x.dim() == 3 and on_fused_device and dtype in (torch.float32, torch.float64):
            return fused
        return module_derivatives(self.module, self.loss)

    @torch.no_grad()
    def _update_running_statistics(self, x: torch.Tensor, derivatives=None):
        """Batch norm's running statistics (training mode, tracked) take one
        update per task from its support set at the meta-parameters, task
        after task, as a per-task loop's first forward makes; the adapted
        forwards inside the transforms use batch statistics only."""
        if self._runs_fused(derivatives):
            return  # the learner is an MLP the fused kernels run: no batch norm
        if tracking_batch_norms(self.module):
            for task in x:
                self.module(task)

    def _device(self) -> torch.device:
        return next(self.module.parameters()).device

    def _inner_lr(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """The inner learning rate: 0-dimensional, or flat [P] (Meta-SGD)."""
        return torch.tensor(self.inner_lr, dtype=dtype, device=device)

    def _parameters_and_step_size(self):
        """The module's parameters (theta, flattened in this order) and the
        inner learning rate, in their common dtype, 0 for parameters that do
        not require grad."""
        params = list(self.module.parameters())
        dtype = functools.reduce(torch.promote_types, (p.dtype for p in params))
        lr = self._inner_lr(dtype, params[0].device)
        if not all(p.requires_grad for p in params):
            lr = lr * torch.cat(
                [torch.full((p.numel(),), float(p.requires_grad), dtype=dtype, device=lr.device) for p in params]
            )
        return params, lr

    def _flat_parameters_and_step_size(self):
        """The module's parameters as one flat vector theta [P] (differentiable)
        and the inner learning rate."""
        params, lr = self._parameters_and_step_size()
        return torch.cat([p.reshape(-1) for p in params]), lr

    def _adapted(self, x: torch.Tensor, y: torch.Tensor, steps: int):
        """(theta [P], per-task adapted parameters [T, P], the support loss [T] before each step)."""
        theta, lr = self._flat_parameters_and_step_size()
        derivatives = self.derivatives(x, theta.dtype)
        thetas, losses = theta, []  # shared by every task until the first step
        for _ in range(steps):
            loss, grad = derivatives(thetas, x, y)[:2]
            losses.append(loss)
            thetas = thetas - lr * grad
        return theta, thetas.expand(x.shape[0], -1), losses

    @torch.no_grad()
    def adapt(
        self, x_support: torch.Tensor, y_support: torch.Tensor, steps: Optional[int] = None
    ) -> Dict[str, torch.Tensor]:
        """Per-task adapted parameters ``{name: [T, *shape]}`` after ``steps``
        (default ``inner_steps``) inner steps, without meta-gradients; use
        with ``torch.func.functional_call`` or :meth:`predict`."""
        name = type(self).__name__
        check_tasks(name, self._device(), x_support=x_support, y_support=y_support)
        steps = self.inner_steps if steps is None else check_steps(name, steps)
        return flat_to_dict(self.module, self._adapted(x_support, y_support, steps)[1])

    @torch.no_grad()
    def predict(
        self, x_support: torch.Tensor, y_support: torch.Tensor, x_query: torch.Tensor, steps: Optional[int] = None
    ) -> torch.Tensor:
        """The adapted learners' outputs on ``x_query`` ``[T, ...]``."""
        check_tasks(type(self).__name__, self._device(), x_support=x_support, y_support=y_support, x_query=x_query)
        steps = self.inner_steps if steps is None else check_steps(type(self).__name__, steps)
        return self._task_outputs(self._adapted(x_support, y_support, steps)[1], x_query)

    @torch.no_grad()
    def _task_outputs(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Each task's outputs on ``x [T, N, ...]`` under its parameters
        ``[T, P]``, batch norm on the task's batch as in the inner loop (one
        task at a time for convolutional learners on the CPU, as there)."""

        def call(p, inputs):
            return torch.func.functional_call(self.module, flat_to_dict(self.module, p), (inputs,))

        with batch_statistics(self.module):
            if one_task_at_a_time(self.module, x.device):
                convolutions = convolution_weights(self.module)
                return torch.stack(
                    [
                        call_with_parameters(self.module, flat_to_dict(self.module, p), (xt,), convolutions)
                        for p, xt in zip(params, x)
                    ]
                )
            return torch.func.vmap(call)(params, x)

    def _meta_batch_output(
        self,
        losses: torch.Tensor,
        adapted: torch.Tensor,
        x_query: torch.Tensor,
        y_query: torch.Tensor,
        outputs: Optional[torch.Tensor] = None,
    ) -> MetaBatchOutput:
        """The output of one meta-batch; the query ``outputs`` computed here
        unless the adaptation gave them."""
        if outputs is None:
            outputs = self._task_outputs(adapted, x_query)
        accuracy = None
        if self.loss == "cross_entropy":
            accuracy = (outputs.argmax(-1) == y_query).to(outputs.dtype).mean()
        return MetaBatchOutput(losses.mean(), outputs, accuracy)
