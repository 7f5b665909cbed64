"""Batched MAML (MAML, FOMAML, Meta-SGD, ANIL heads) and Reptile: all tasks of a
meta-batch adapted at once."""

import functools
import numbers
from typing import Dict, NamedTuple, Optional

import torch
from torch import nn

from .. import _build_config
from .engine import (Loss, loss_function, _proximal_descent, batch_statistics, flat_to_dict,
                     implicit_query_loss, kept_graph_implicit_query_loss, kept_graph_query_loss,
                     maml_query_loss, mlp_derivatives, mlp_structure, module_derivatives,
                     module_task_forward, one_task_at_a_time, tracking_batch_norms)

__all__ = ["ANIL", "BatchedMAML", "MetaBatchOutput", "Reptile", "iMAML"]


class MetaBatchOutput(NamedTuple):
    """What a classifier's training loop needs of one meta-batch."""

    loss: torch.Tensor  # the mean query loss over tasks (differentiable)
    outputs: torch.Tensor  # the adapted learners' query outputs [T, Q, ...] (no gradient)
    accuracy: Optional[torch.Tensor]  # query accuracy with a cross-entropy loss, else None


def _check_tasks(name: str, device: torch.device, **tensors: torch.Tensor):
    """All tensors are [T, N, ...] with the same T > 0, on the module's
    device, and the support and query sets are not empty."""
    for key, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: {key} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() < 2:
            raise ValueError(f"{name}: {key} must be [T, N, ...] (tasks, points), got shape "
                             f"{list(t.shape)}")
        if t.device != device:
            raise ValueError(f"{name}: {key} is on {t.device} but the module's parameters are on "
                             f"{device}; move them to the same device")
    counts = {key: t.shape[0] for key, t in tensors.items()}
    if len(set(counts.values())) > 1:
        raise ValueError(f"{name}: the number of tasks differs between "
                         + ", ".join(f"{k} ({v})" for k, v in counts.items()))
    if 0 in counts.values():
        raise ValueError(f"{name}: there are no tasks (T = 0); pass at least one task")
    for key, what in (("x_support", "support"), ("x_query", "query")):
        if key in tensors and tensors[key].shape[1] == 0:
            raise ValueError(f"{name}: the {what} set is empty ({key} has 0 points per task)")


def _check_steps(name: str, steps) -> int:
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 0:
        raise ValueError(f"{name}: the number of inner steps must be an int >= 0, got {steps!r}")
    return int(steps)


class _TaskBatchLearner(nn.Module):
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
        self.inner_steps = _check_steps(name, inner_steps)
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
            raise ValueError(f"{type(self).__name__}: unknown memory policy {memory!r}; expected "
                             "one of " + ", ".join(map(repr, self.MEMORY_POLICIES)))
        return memory

    def _keeps_graphs(self, derivatives, device: torch.device) -> bool:
        """Whether this call takes the generic path with the ``"keep"``
        policy (``self.memory``, BatchedMAML and iMAML)."""
        if self._runs_fused(derivatives):
            return False
        return self.memory == "keep" or (self.memory == "auto"
                                         and one_task_at_a_time(self.module, device))

    def derivatives(self, x: torch.Tensor, dtype: torch.dtype):
        """The derivatives function for inputs ``x`` and parameters of
        ``dtype``: the fused kernels where they support the learner."""
        fused = self._fused_derivatives()
        on_fused_device = x.device.type == "cpu" or (x.device.type == "cuda" and
                                                     _build_config.WITH_CUDA)
        if (fused is not None and x.dim() == 3 and on_fused_device
                and dtype in (torch.float32, torch.float64)):
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
            lr = lr * torch.cat([torch.full((p.numel(),), float(p.requires_grad), dtype=dtype,
                                            device=lr.device) for p in params])
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
    def adapt(self, x_support: torch.Tensor, y_support: torch.Tensor,
              steps: Optional[int] = None) -> Dict[str, torch.Tensor]:
        """Per-task adapted parameters ``{name: [T, *shape]}`` after ``steps``
        (default ``inner_steps``) inner steps, without meta-gradients; use
        with ``torch.func.functional_call`` or :meth:`predict`."""
        name = type(self).__name__
        _check_tasks(name, self._device(), x_support=x_support, y_support=y_support)
        steps = self.inner_steps if steps is None else _check_steps(name, steps)
        return flat_to_dict(self.module, self._adapted(x_support, y_support, steps)[1])

    @torch.no_grad()
    def predict(self, x_support: torch.Tensor, y_support: torch.Tensor, x_query: torch.Tensor,
                steps: Optional[int] = None) -> torch.Tensor:
        """The adapted learners' outputs on ``x_query`` ``[T, ...]``."""
        _check_tasks(type(self).__name__, self._device(), x_support=x_support, y_support=y_support,
                     x_query=x_query)
        steps = self.inner_steps if steps is None else _check_steps(type(self).__name__, steps)
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
                return torch.stack([call(p, inputs) for p, inputs in zip(params, x)])
            return torch.func.vmap(call)(params, x)

    def _meta_batch_output(self, losses: torch.Tensor, adapted: torch.Tensor, x_query: torch.Tensor,
                           y_query: torch.Tensor, outputs: Optional[torch.Tensor] = None
                           ) -> MetaBatchOutput:
        """The output of one meta-batch; the query ``outputs`` computed here
        unless the adaptation gave them."""
        if outputs is None:
            outputs = self._task_outputs(adapted, x_query)
        accuracy = None
        if self.loss == "cross_entropy":
            accuracy = (outputs.argmax(-1) == y_query).to(outputs.dtype).mean()
        return MetaBatchOutput(losses.mean(), outputs, accuracy)


class BatchedMAML(_TaskBatchLearner):
    """Second-order MAML over a batch of tasks at once.

    ``bm(x_support, y_support, x_query, y_query)`` on ``[T, ...]`` tensors
    adapts a copy of the module to each task with ``inner_steps`` gradient
    steps on its support set and returns the mean query loss over tasks;
    ``.backward()`` gives the exact meta-gradient (through Hessian-vector
    products, :func:`fastmeta.functional.maml_query_loss`) of the module's
    parameters, of the inputs (ANIL: a feature extractor before the head) and,
    with ``learn_inner_lr``, of the learning rates.

    If the module is an MLP (``nn.Sequential`` of exactly ``nn.Linear`` with
    bias and ReLU, Tanh, Sigmoid, ELU, without hooks, parametrizations or
    tied weights), the loss is ``"mse"`` or ``"cross_entropy"`` and inputs
    are ``[T, N, features]``, the fused kernels compute every task's
    derivatives at once, with memory independent of ``inner_steps``;
    otherwise the generic path does (``.fused`` says which), as ``memory``
    chooses:

    - ``"recompute"``: the engine keeps only the inner trajectory's
      parameters and recomputes each step's gradient and Hessian-vector
      product (torch.func, vmapped over tasks) in the backward: memory
      independent of ``inner_steps``.
    - ``"keep"``: each task's inner steps keep their graph and its
      meta-gradient is PyTorch's double backward, taken in the forward
      before the next task starts: no recomputation, memory of one task's
      graph (it grows with ``inner_steps``).
    - ``"auto"`` (default): ``"keep"`` where the tasks run one after the
      other anyway (a convolutional learner on the CPU), ``"recompute"``
      elsewhere.

    Args:
        module: the learner; the meta-parameters are its initial parameters.
            Parameters that do not require grad are not adapted.
        inner_lr: the inner learning rate (the initial one with ``learn_inner_lr``).
        inner_steps: the number of inner gradient steps.
        first_order: FOMAML: the inner gradients count as constants.
        learn_inner_lr: Meta-SGD: one learnable learning rate per parameter
            entry, the parameters ``inner_lrs`` of this module.
        loss: ``"mse"`` (mean over points and outputs), ``"cross_entropy"``
            (targets are int64 labels ``[T, N]``) or ``loss(outputs, targets)``
            for one task.
        memory: the generic path's policy, ``"auto"``, ``"keep"`` or
            ``"recompute"`` (above).
    """

    def __init__(self, module: nn.Module, inner_lr: float, inner_steps: int = 1,
                 first_order: bool = False, learn_inner_lr: bool = False, loss: Loss = "mse",
                 memory: str = "auto"):
        super().__init__(module, inner_steps, loss)
        self.memory = self._check_memory(memory)
        self.first_order = bool(first_order)
        self.learn_inner_lr = bool(learn_inner_lr)
        if learn_inner_lr:
            self.inner_lrs = nn.ParameterList(
                [nn.Parameter(torch.full_like(p, float(inner_lr))) for p in module.parameters()])
        else:
            self.inner_lr = float(inner_lr)

    def _inner_lr(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        if self.learn_inner_lr:
            return torch.cat([lr.reshape(-1) for lr in self.inner_lrs]).to(device, dtype)
        return super()._inner_lr(dtype, device)

    def forward(self, x_support: torch.Tensor, y_support: torch.Tensor, x_query: torch.Tensor,
                y_query: torch.Tensor, return_outputs: bool = False):
        """The mean over tasks of the query loss after adaptation; with
        ``return_outputs``, a :class:`MetaBatchOutput`: that loss, the
        adapted learners' query outputs and (cross-entropy) their accuracy,
        from the same adaptation."""
        params, lr = self._parameters_and_step_size()
        _check_tasks("BatchedMAML", lr.device, x_support=x_support, y_support=y_support,
                     x_query=x_query, y_query=y_query)
        derivatives = self.derivatives(x_support, lr.dtype)
        outputs = None  # the query outputs, where the adaptation gave them
        if self._keeps_graphs(derivatives, x_support.device):
            losses, adapted, outputs = kept_graph_query_loss(
                module_task_forward(self.module, self.loss), params, lr, x_support, y_support, x_query,
                y_query, self.inner_steps, self.first_order, return_adapted=True)
        else:
            losses, adapted = maml_query_loss(derivatives, params, lr, x_support, y_support, x_query,
                                              y_query, self.inner_steps, self.first_order,
                                              return_adapted=True)
        self._update_running_statistics(x_support, derivatives)
        if return_outputs:
            return self._meta_batch_output(losses, adapted, x_query, y_query, outputs)
        return losses.mean()


class ANIL(nn.Module):
    """ANIL (Raghu et al. 2020): almost no inner loop. The body (a feature
    extractor) is meta-learned by the outer loop only; the head is adapted to
    each task by :class:`BatchedMAML` on the body's features, all tasks at
    once (with the fused MLP kernels when the head is an MLP, as a linear
    classifier is). The meta-gradient reaches the body through the head's
    gradient with respect to its inputs.

    ``anil(x_support, y_support, x_query, y_query)`` on ``[T, N, ...]``
    inputs returns the mean query loss over tasks. The body embeds all
    tasks' support images in one call, then their query images in another.

    Args:
        body: maps ``[n, ...]`` inputs to ``[n, D]`` features.
        head: the adapted learner on ``[n, D]`` features (e.g. ``nn.Linear(D, ways)``).
        inner_lr, inner_steps, first_order, learn_inner_lr, loss: as
            :class:`BatchedMAML`'s (the loss defaults to cross-entropy here).

    Example:
        >>> anil = ANIL(Conv4(1), nn.Sequential(nn.Linear(64, 5)), inner_lr=0.4)
        >>> loss = anil(x_support, y_support, x_query, y_query)   # [T, N, 1, 28, 28] images
        >>> loss.backward()
    """

    def __init__(self, body: nn.Module, head: nn.Module, inner_lr: float, inner_steps: int = 1,
                 first_order: bool = False, learn_inner_lr: bool = False, loss: Loss = "cross_entropy"):
        super().__init__()
        self.body = body
        self.head = BatchedMAML(head, inner_lr, inner_steps, first_order, learn_inner_lr, loss)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The body's features ``[T, N, D]`` of inputs ``[T, N, ...]``."""
        if x.dim() < 2:
            raise ValueError(f"ANIL: inputs must be [T, N, ...] (tasks, examples, ...), got shape "
                             f"{list(x.shape)}")
        features = self.body(x.flatten(0, 1))
        if features.dim() != 2:
            raise ValueError(f"ANIL: the body must return [n, D] features, got shape "
                             f"{list(features.shape)}")
        return features.unflatten(0, x.shape[:2])

    def forward(self, x_support: torch.Tensor, y_support: torch.Tensor, x_query: torch.Tensor,
                y_query: torch.Tensor, return_outputs: bool = False):
        """The mean over tasks of the query loss after adapting the head
        (with ``return_outputs``, a :class:`MetaBatchOutput`)."""
        return self.head(self.features(x_support), y_support, self.features(x_query), y_query,
                         return_outputs)

    @torch.no_grad()
    def adapt(self, x_support: torch.Tensor, y_support: torch.Tensor,
              steps: Optional[int] = None) -> Dict[str, torch.Tensor]:
        """The head's per-task adapted parameters ``{name: [T, *shape]}``."""
        return self.head.adapt(self.features(x_support), y_support, steps)

    @torch.no_grad()
    def predict(self, x_support: torch.Tensor, y_support: torch.Tensor, x_query: torch.Tensor,
                steps: Optional[int] = None) -> torch.Tensor:
        """The adapted heads' outputs on the query features, ``[T, Q, ...]``."""
        return self.head.predict(self.features(x_support), y_support, self.features(x_query), steps)


class Reptile(_TaskBatchLearner):
    """Reptile (Nichol et al. 2018), batched: each task's copy takes
    ``inner_steps`` SGD steps on its data, then ``step`` moves the module
    towards their mean: theta <- theta + outer_lr * mean_t(theta_t - theta).

    ``reptile.step(x, y)`` on ``[T, N, ...]`` tensors updates the module's
    parameters in place (no optimizer needed) and returns the tasks' mean
    loss before adaptation (None with no inner steps).
    """

    def __init__(self, module: nn.Module, inner_lr: float, inner_steps: int = 5,
                 outer_lr: float = 0.1, loss: Loss = "mse"):
        super().__init__(module, inner_steps, loss)
        self.inner_lr = float(inner_lr)
        self.outer_lr = float(outer_lr)

    def _mean_adapted(self, x: torch.Tensor, y: torch.Tensor):
        """(theta [P], the tasks' mean adapted parameters [P], their mean loss
        before adaptation or None with no inner steps)."""
        _check_tasks("Reptile", self._device(), x_support=x, y_support=y)
        theta, thetas, losses = self._adapted(x, y, self.inner_steps)
        self._update_running_statistics(x)
        return theta, thetas.mean(0), losses[0].mean() if losses else None

    @torch.no_grad()
    def step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        theta, mean, loss = self._mean_adapted(x, y)
        new_theta = theta + self.outer_lr * (mean - theta)
        for name, value in flat_to_dict(self.module, new_theta).items():
            self.module.get_parameter(name).copy_(value)
        return loss

    @torch.no_grad()
    def accumulate_grad(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Reptile's step as a gradient, for an optimizer (and an all-reduce
        across processes): adds ``theta - mean_t(theta_t)`` to each
        parameter's ``.grad``, so that SGD with learning rate ``outer_lr``
        makes :meth:`step`'s update. Returns the tasks' mean loss before
        adaptation (None with no inner steps)."""
        theta, mean, loss = self._mean_adapted(x, y)
        for name, value in flat_to_dict(self.module, theta - mean).items():
            param = self.module.get_parameter(name)
            param.grad = value.clone() if param.grad is None else param.grad + value
        return loss


class iMAML(_TaskBatchLearner):
    """Implicit MAML (Rajeswaran et al. 2019) over a batch of tasks at once.

    Each task's parameters phi take ``inner_steps`` gradient steps of size
    ``inner_lr`` on the proximal problem L_support(phi) + lam/2 ||phi -
    theta||^2 from theta; ``imaml(x_support, y_support, x_query, y_query)``
    returns the mean query loss at phi, and ``.backward()`` gives the module's
    parameters the implicit meta-gradient mean_t (I + H_t / lam)^-1 grad
    L_query(phi_t), from ``cg_steps`` of conjugate gradient on batched
    Hessian-vector products (the fused MLP kernels where they apply,
    torch.func otherwise). Only phi is kept: memory does not grow with
    ``inner_steps``. ``adapt`` and ``predict`` solve the same proximal problem.

    ``memory`` (``"auto"``, ``"keep"``, ``"recompute"``) is as
    :class:`BatchedMAML`'s for the generic path: ``"keep"`` runs the tasks
    one after the other through PyTorch autograd, each keeping the graph of
    its support gradient at phi (not of the inner steps) for the
    conjugate-gradient steps, so memory stays independent of
    ``inner_steps`` either way.

    Args:
        module: the learner; theta is its parameters.
        inner_lr: the inner step size.
        inner_steps: gradient steps on the inner problem.
        lam: the proximal regularisation lambda (> 0).
        cg_steps: conjugate-gradient iterations (>= 1).
        loss: ``"mse"``, ``"cross_entropy"`` or ``loss(outputs, targets)``.
        memory: the generic path's policy (above).
    """

    def __init__(self, module: nn.Module, inner_lr: float, inner_steps: int = 16, lam: float = 2.0,
                 cg_steps: int = 5, loss: Loss = "mse", memory: str = "auto"):
        super().__init__(module, inner_steps, loss)
        self.memory = self._check_memory(memory)
        if not isinstance(lam, numbers.Real) or isinstance(lam, bool) or not lam > 0:
            raise ValueError(f"iMAML: lam must be a number > 0, got {lam!r}")
        if isinstance(cg_steps, bool) or not isinstance(cg_steps, numbers.Integral) or cg_steps < 1:
            raise ValueError(f"iMAML: cg_steps must be an int >= 1, got {cg_steps!r}")
        self.inner_lr, self.lam, self.cg_steps = float(inner_lr), float(lam), int(cg_steps)

    def _adapted(self, x: torch.Tensor, y: torch.Tensor, steps: int):
        theta, lr = self._flat_parameters_and_step_size()
        phi = _proximal_descent(self.derivatives(x, theta.dtype), theta, lr, self.lam, x, y, steps)
        return theta, phi.expand(x.shape[0], -1), []

    def forward(self, x_support: torch.Tensor, y_support: torch.Tensor, x_query: torch.Tensor,
                y_query: torch.Tensor, return_outputs: bool = False):
        """The mean over tasks of the query loss at the inner solutions (with
        ``return_outputs``, a :class:`MetaBatchOutput`, as BatchedMAML's)."""
        theta, lr = self._flat_parameters_and_step_size()
        _check_tasks("iMAML", theta.device, x_support=x_support, y_support=y_support,
                     x_query=x_query, y_query=y_query)
        if y_support.requires_grad or y_query.requires_grad:
            raise ValueError("iMAML: targets that require grad are not supported; detach them")
        derivatives = self.derivatives(x_support, theta.dtype)
        args = (theta, lr, x_support, y_support, x_query, y_query, self.inner_steps, self.lam,
                self.cg_steps)
        outputs = None
        if self._keeps_graphs(derivatives, x_support.device):
            losses, adapted, outputs = kept_graph_implicit_query_loss(
                module_task_forward(self.module, self.loss), *args, return_adapted=True)
        else:
            losses, adapted = implicit_query_loss(derivatives, *args, return_adapted=True)
        self._update_running_statistics(x_support, derivatives)
        if return_outputs:
            return self._meta_batch_output(losses, adapted, x_query, y_query, outputs)
        return losses.mean()
