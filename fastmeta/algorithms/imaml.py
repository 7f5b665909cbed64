"""Implicit MAML (Rajeswaran, Finn, Kakade and Levine, "Meta-Learning with
Implicit Gradients", 2019), batched."""

import numbers

import torch
from torch import nn

from ._task_batch import TaskBatchLearner, check_tasks
from .engine import Loss, _proximal_descent, implicit_query_loss, kept_graph_implicit_query_loss, module_task_forward

__all__ = ["iMAML"]


class iMAML(TaskBatchLearner):
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

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from fastmeta.algorithms import iMAML
        >>> from fastmeta.data import sinusoid_tasks
        >>> net = nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 1))
        >>> imaml = iMAML(net, inner_lr=0.01, inner_steps=16, lam=2.0, cg_steps=5)
        >>> x_s, y_s, x_q, y_q = sinusoid_tasks(8, 10, num_query=10)
        >>> imaml(x_s, y_s, x_q, y_q).backward()   # the implicit meta-gradient
    """

    def __init__(
        self,
        module: nn.Module,
        inner_lr: float,
        inner_steps: int = 16,
        lam: float = 2.0,
        cg_steps: int = 5,
        loss: Loss = "mse",
        memory: str = "auto",
    ):
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

    def forward(
        self,
        x_support: torch.Tensor,
        y_support: torch.Tensor,
        x_query: torch.Tensor,
        y_query: torch.Tensor,
        return_outputs: bool = False,
    ):
        """The mean over tasks of the query loss at the inner solutions (with
        ``return_outputs``, a :class:`MetaBatchOutput`, as BatchedMAML's)."""
        theta, lr = self._flat_parameters_and_step_size()
        check_tasks("iMAML", theta.device, x_support=x_support, y_support=y_support, x_query=x_query, y_query=y_query)
        if y_support.requires_grad or y_query.requires_grad:
            raise ValueError("iMAML: targets that require grad are not supported; detach them")
        derivatives = self.derivatives(x_support, theta.dtype)
        args = (theta, lr, x_support, y_support, x_query, y_query, self.inner_steps, self.lam, self.cg_steps)
        outputs = None
        if self._keeps_graphs(derivatives, x_support.device):
            losses, adapted, outputs = kept_graph_implicit_query_loss(
                module_task_forward(self.module, self.loss), *args, return_adapted=True
            )
        else:
            losses, adapted = implicit_query_loss(derivatives, *args, return_adapted=True)
        self._update_running_statistics(x_support, derivatives)
        if return_outputs:
            return self._meta_batch_output(losses, adapted, x_query, y_query, outputs)
        return losses.mean()
