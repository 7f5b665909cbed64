"""Batched MAML: second-order MAML (Finn, Abbeel and Levine, "Model-Agnostic
Meta-Learning for Fast Adaptation of Deep Networks", 2017), first-order MAML
and Meta-SGD (Li, Zhou, Chen and Li, "Meta-SGD: Learning to Learn Quickly
for Few-Shot Learning", 2017), all tasks of a meta-batch at once."""

import torch
from torch import nn

from ._task_batch import TaskBatchLearner, check_tasks
from .engine import Loss, kept_graph_query_loss, maml_query_loss, module_task_forward

__all__ = ["BatchedMAML"]


class BatchedMAML(TaskBatchLearner):
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

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from fastmeta.algorithms import BatchedMAML
        >>> from fastmeta.data import sinusoid_tasks
        >>> net = nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 1))
        >>> maml = BatchedMAML(net, inner_lr=0.01, inner_steps=1)
        >>> x_s, y_s, x_q, y_q = sinusoid_tasks(25, 10, num_query=10)
        >>> loss = maml(x_s, y_s, x_q, y_q)    # the mean query loss of 25 tasks
        >>> loss.backward()                    # the exact second-order meta-gradient
        >>> maml.predict(x_s, y_s, x_q).shape
        torch.Size([25, 10, 1])
    """

    def __init__(
        self,
        module: nn.Module,
        inner_lr: float,
        inner_steps: int = 1,
        first_order: bool = False,
        learn_inner_lr: bool = False,
        loss: Loss = "mse",
        memory: str = "auto",
    ):
        super().__init__(module, inner_steps, loss)
        self.memory = self._check_memory(memory)
        self.first_order = bool(first_order)
        self.learn_inner_lr = bool(learn_inner_lr)
        if learn_inner_lr:
            self.inner_lrs = nn.ParameterList(
                [nn.Parameter(torch.full_like(p, float(inner_lr))) for p in module.parameters()]
            )
        else:
            self.inner_lr = float(inner_lr)

    def _inner_lr(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        if self.learn_inner_lr:
            return torch.cat([lr.reshape(-1) for lr in self.inner_lrs]).to(device, dtype)
        return super()._inner_lr(dtype, device)

    def forward(
        self,
        x_support: torch.Tensor,
        y_support: torch.Tensor,
        x_query: torch.Tensor,
        y_query: torch.Tensor,
        return_outputs: bool = False,
    ):
        """The mean over tasks of the query loss after adaptation; with
        ``return_outputs``, a :class:`MetaBatchOutput`: that loss, the
        adapted learners' query outputs and (cross-entropy) their accuracy,
        from the same adaptation."""
        params, lr = self._parameters_and_step_size()
        check_tasks(
            "BatchedMAML", lr.device, x_support=x_support, y_support=y_support, x_query=x_query, y_query=y_query
        )
        derivatives = self.derivatives(x_support, lr.dtype)
        outputs = None  # the query outputs, where the adaptation gave them
        args = (params, lr, x_support, y_support, x_query, y_query, self.inner_steps, self.first_order)
        if self._keeps_graphs(derivatives, x_support.device):
            losses, adapted, outputs = kept_graph_query_loss(
                module_task_forward(self.module, self.loss), *args, return_adapted=True
            )
        else:
            losses, adapted = maml_query_loss(derivatives, *args, return_adapted=True)
        self._update_running_statistics(x_support, derivatives)
        if return_outputs:
            return self._meta_batch_output(losses, adapted, x_query, y_query, outputs)
        return losses.mean()
