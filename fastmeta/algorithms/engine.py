"""The meta-gradient engine of second-order MAML, and batched Hessian-vector products.

The exact MAML meta-gradient needs only Hessian-vector products along the
inner trajectory. For K inner steps theta_{k+1} = theta_k - lr * g(theta_k)
(``lr`` a scalar or per-parameter tensor, Meta-SGD), the gradient of the query
loss L_q(theta_K) is the reverse recursion

    v_K = grad L_q(theta_K),   v_k = v_{k+1} - H(theta_k) (lr * v_{k+1}),

the gradient with respect to theta_0 is v_0, and with respect to lr it is
-sum_k v_{k+1} * g(theta_k). :func:`maml_query_loss` runs it keeping only the
K parameter vectors of the trajectory, never a graph of graphs.

Per-task derivatives come from a *derivatives* function
``(params, x, target, direction=None, input_grad=False) ->
(loss [T], grad, grad_input, hvp, hvp_input)``, ``params`` per task ``[T, P]``
or ``[P]`` shared by every task (the first inner step, where torch.func then
runs each layer once on all tasks' inputs instead of per-task weights): :func:`mlp_derivatives` (the
fused kernels, for MLP learners) or :func:`module_derivatives` (torch.func,
for any module, through :func:`task_derivatives`).

:func:`kept_graph_query_loss` and :func:`kept_graph_implicit_query_loss`
are the alternative through PyTorch autograd, one task after the other,
each task's graph kept for its double backward (``memory="keep"``).

``BatchedMAML``, ``Reptile`` and ``fastmeta.functional`` (which re-exports
this module's public names) are built on it.
"""

from typing import Callable, Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as module_hooks

from .._checks import check_choice
from ..ops.mlp_task_derivatives import MLP_LOSSES

__all__ = [
    "batched_hvp",
    "loss_function",
    "maml_query_loss",
    "kept_graph_query_loss",
    "module_task_forward",
    "implicit_query_loss",
    "kept_graph_implicit_query_loss",
    "mlp_derivatives",
    "module_derivatives",
    "mlp_structure",
    "flat_to_dict",
    "call_with_parameters",
    "convolution_weights",
    "task_derivatives",
    "batch_statistics",
    "conjugate_gradient",
]

Loss = Union[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]
_MODULE_ACTIVATIONS = {nn.ReLU: "relu", nn.Tanh: "tanh", nn.Sigmoid: "sigmoid", nn.ELU: "elu", nn.Identity: "identity"}


def loss_function(loss: Loss) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    if callable(loss):
        return loss
    if loss == "mse":
        # (out - y)^2 rather than F.mse_loss, which PyTorch's forward-mode AD fails on.
        return lambda out, y: ((out - y) ** 2).mean()
    if loss == "cross_entropy":
        return F.cross_entropy
    raise ValueError(
        f"unknown loss {loss!r}; expected one of {', '.join(map(repr, MLP_LOSSES))} "
        "or a callable (outputs, targets) -> scalar loss"
    )


def flat_to_dict(module: nn.Module, flat: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Splits flat parameters ``[..., P]`` (the module's parameters in order,
    each flattened) into a dict of ``[..., *shape]`` tensors for
    ``torch.func.functional_call``."""
    named = list(module.named_parameters())
    total = sum(p.numel() for _, p in named)
    if flat.dim() == 0 or flat.shape[-1] != total:
        raise ValueError(
            f"flat_to_dict: flat must be [..., {total}] (the module's parameter count), got shape {list(flat.shape)}"
        )
    if not named:
        return {}
    # One split rather than a slice per parameter: the gradient with respect
    # to ``flat`` is then one concatenation, not a zero-filled [P] per parameter.
    parts = flat.split([p.numel() for _, p in named], dim=-1)
    return {name: part.reshape(*flat.shape[:-1], *p.shape) for (name, p), part in zip(named, parts)}


def convolution_weights(module: nn.Module) -> frozenset:
    """The names of ``module``'s 2-d convolution weights, for :func:`call_with_parameters`."""
    return frozenset(f"{name}.weight".lstrip(".") for name, m in module.named_modules() if isinstance(m, nn.Conv2d))


def call_with_parameters(
    module: nn.Module, parameters: Dict[str, torch.Tensor], args: tuple, convolutions: frozenset
) -> torch.Tensor:
    """``torch.func.functional_call(module, parameters, args)`` for one task,
    outside ``vmap``, with the weights named in ``convolutions``
    (:func:`convolution_weights`) laid out channels-last on the CPU, where
    oneDNN's channels-last convolutions are the faster ones (see
    :class:`fastmeta.nn.ChannelsLastConv2d`; the values are the same)."""
    if args[0].device.type == "cpu":
        parameters = {
            name: value.to(memory_format=torch.channels_last) if name in convolutions else value
            for name, value in parameters.items()
        }
    return torch.func.functional_call(module, parameters, args)


_GLOBAL_HOOKS = (
    module_hooks._global_forward_hooks,
    module_hooks._global_forward_pre_hooks,
    module_hooks._global_backward_hooks,
    module_hooks._global_backward_pre_hooks,
)


def _has_hooks(module: nn.Module) -> bool:
    return bool(
        module._forward_hooks or module._forward_pre_hooks or module._backward_hooks or module._backward_pre_hooks
    )


def mlp_structure(module: nn.Module) -> Optional[Tuple[list, list]]:
    """``(widths, activations)`` of an MLP whose computation the fused kernels
    reproduce exactly: an ``nn.Linear`` or an ``nn.Sequential`` of
    ``nn.Linear`` layers with bias (exactly those classes, not subclasses;
    a parametrized layer, spectral norm say, has a class of its own), each
    followed by at most one of ReLU, Tanh, Sigmoid, ELU (alpha 1) or
    Identity, with no hooks and no shared parameters; None for any other
    module. Cheap enough to check at every call."""
    layers = list(module._modules.values()) if type(module) is nn.Sequential else [module]
    if any(_GLOBAL_HOOKS) or _has_hooks(module) or any(_has_hooks(m) for m in layers):
        return None
    widths, activations, seen = [], [], set()
    for layer in layers:
        if type(layer) is nn.Linear:
            weight, bias = layer._parameters["weight"], layer._parameters["bias"]
            if bias is None or (widths and widths[-1] != layer.in_features):
                return None
            if id(weight) in seen or id(bias) in seen:
                return None  # tied weights
            seen.update((id(weight), id(bias)))
            widths[-1:] = [layer.in_features, layer.out_features]
            activations.append("identity")
        elif type(layer) in _MODULE_ACTIVATIONS and activations and activations[-1] == "identity":
            if type(layer) is nn.ELU and layer.alpha != 1.0:
                return None
            activations[-1] = _MODULE_ACTIVATIONS[type(layer)]
        elif type(layer) is nn.Identity:
            continue
        else:
            return None
    if not activations or len(activations) > 8:
        return None
    return widths, activations


def mlp_derivatives(widths: Sequence[int], activations: Sequence[str], loss: str):
    """The derivatives function of an MLP learner: the fused kernels
    (``fastmeta.ops.mlp_task_derivatives``)."""

    check_choice("mlp_derivatives", "loss", loss, MLP_LOSSES)
    widths, activations = list(widths), list(activations)

    def derivatives(params, x, target, direction=None, input_grad=False):
        if params.dim() == 1:
            params = params.expand(x.shape[0], -1)
        # The op checks its operands.
        out = torch.ops.fastmeta.mlp_task_derivatives(
            params, x, target, direction, widths, activations, loss, input_grad
        )
        return (
            out[0],
            out[1],
            out[2] if input_grad else None,
            None if direction is None else out[3],
            out[4] if input_grad and direction is not None else None,
        )

    return derivatives


def module_derivatives(module: nn.Module, loss: Loss):
    """The derivatives function of any module through torch.func:
    forward-over-reverse Hessian-vector products, vmapped over tasks. The
    flat parameters follow ``module.parameters()``. Batch norm in training
    mode normalises each task with its own batch statistics and leaves the
    running statistics alone (see :func:`batch_statistics`)."""
    criterion = loss_function(loss)
    convolutions = convolution_weights(module)

    def task_loss(p, x, y):
        return criterion(torch.func.functional_call(module, flat_to_dict(module, p), (x,)), y)

    def channels_last_task_loss(p, x, y):
        return criterion(call_with_parameters(module, flat_to_dict(module, p), (x,), convolutions), y)

    def derivatives(params, x, target, direction=None, input_grad=False):
        vectorize = not one_task_at_a_time(module, x.device)
        # Gradients alone run the convolutions channels-last; Hessian-vector
        # products keep the default layout: vmap batches their tangents, and
        # a batched tensor cannot be laid out channels-last.
        loss_fn = channels_last_task_loss if direction is None else task_loss
        with batch_statistics(module):
            return task_derivatives(loss_fn, params, x, target, direction, input_grad, vectorize)

    return derivatives


def one_task_at_a_time(module: nn.Module, device: torch.device) -> bool:
    """Whether the tasks of ``module`` run one after the other where their
    weights differ: a convolutional learner on the CPU, where torch.func's
    batching rule would run a convolution with per-task weights as one
    grouped convolution, several times slower than a plain convolution per
    task (32 tasks of a conv4 learner: 4x)."""
    return device.type == "cpu" and any(isinstance(m, nn.modules.conv._ConvNd) for m in module.modules())


def tracking_batch_norms(module: nn.Module) -> list:
    """The batch-norm layers of ``module`` that are training and update running statistics."""
    return [
        m
        for m in module.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats
    ]


class batch_statistics:
    """Within it, the batch-norm layers of ``module`` that are training and
    track running statistics normalise with batch statistics only and do not
    update their running statistics: the in-place update is what torch.func's
    transforms refuse ("would mutate a captured Tensor"). The layers are as
    before on exit."""

    def __init__(self, module: nn.Module):
        self.layers = tracking_batch_norms(module)
        self.saved = []

    def __enter__(self):
        for m in self.layers:
            self.saved.append((m.running_mean, m.running_var, m.num_batches_tracked))
            m.running_mean = m.running_var = m.num_batches_tracked = None
            m.track_running_stats = False

    def __exit__(self, *exc):
        for m, (mean, var, count) in zip(self.layers, self.saved):
            m.running_mean, m.running_var, m.num_batches_tracked = mean, var, count
            m.track_running_stats = True
        self.saved = []


def task_derivatives(
    loss_fn,
    params: torch.Tensor,
    x: torch.Tensor,
    target: torch.Tensor,
    direction=None,
    input_grad: bool = False,
    vectorize: bool = True,
):
    """Per-task loss, gradient and Hessian-vector product through torch.func.

    ``loss_fn(params, x, target)`` is one task's scalar loss; ``x``,
    ``target`` and ``direction`` carry the tasks on dim 0, and ``params``
    too unless it is one vector ``[P]`` shared by every task. The
    Hessian-vector product is forward-over-reverse (``jvp`` of ``grad``),
    vmapped over tasks; where PyTorch's forward-mode AD fails on the loss
    (``F.mse_loss`` in PyTorch 2.13 raises "ZeroTensors are immutable"; a
    custom op without a forward-mode rule, as fastmeta's own, raises
    NotImplementedError), it is reverse-over-reverse (``vjp`` of ``grad``) instead. Returns
    ``(loss [T], grad, grad_input, hvp, hvp_input)`` like
    ``torch.ops.fastmeta.mlp_task_derivatives``: ``grad_input`` is
    d loss / d x, ``hvp_input`` is (d^2 loss / d x d params) direction, and
    outputs not asked for are ``None``. Without ``vectorize``, tasks whose
    parameters differ are computed one after the other instead of vmapped.
    """
    from torch.func import grad_and_value, jvp, vjp
    from torch.utils._pytree import tree_map

    def vmap(fn, in_dims, one_by_one_always=False):
        # Shared parameters: vmap runs each layer once on all tasks' inputs.
        if not one_by_one_always and (vectorize or in_dims[0] is None):
            return torch.func.vmap(fn, in_dims=in_dims)

        def one_by_one(*args):
            outs = [fn(*(a if d is None else a[t] for a, d in zip(args, in_dims))) for t in range(args[1].shape[0])]
            return tree_map(lambda *parts: torch.stack(parts), *outs)

        return one_by_one

    # Gradients with respect to the parameters, and to the inputs only where asked for.
    argnums = (0, 1) if input_grad else 0

    def gradient(p, xt, tt):
        grads, loss = grad_and_value(lambda p_, x_: loss_fn(p_, x_, tt), argnums=argnums)(p, xt)
        return (grads if input_grad else (grads,)), loss

    def plain_gradient(p, xt, tt):
        # PyTorch autograd on detached leaves: one task at a time it is
        # faster than torch.func's grad (a conv4 learner: about 15%).
        with torch.enable_grad():
            p, xt = p.detach().requires_grad_(), xt.detach().requires_grad_(input_grad)
            loss = loss_fn(p, xt, tt)
            grads = torch.autograd.grad(loss, (p, xt) if input_grad else p, materialize_grads=True)
        return grads, loss.detach()

    def forward_over_reverse(p, xt, tt, v):
        return jvp(lambda p_: gradient(p_, xt, tt), (p,), (v,))

    def reverse_over_reverse(p, xt, tt, v):
        if input_grad:
            (grads, loss), pullback = vjp(lambda p_, x_: gradient(p_, x_, tt), p, xt)
            return (grads, loss), pullback(((v, torch.zeros_like(xt)), torch.zeros_like(loss)))
        (grads, loss), pullback = vjp(lambda p_: gradient(p_, xt, tt), p)
        return (grads, loss), pullback(((v,), torch.zeros_like(loss)))

    def unpack(grads):  # (d / d params, d / d inputs or None)
        return grads[0], grads[1] if input_grad else None

    shared = None if params.dim() == 1 else 0
    if direction is None:
        # Tasks one by one (shared parameters too: a per-task weight gradient
        # under vmap is far slower there), on values nothing differentiates:
        # plain autograd.
        if not vectorize and not (params.requires_grad or x.requires_grad):
            grads, loss = vmap(plain_gradient, (shared, 0, 0), True)(params, x, target)
        else:
            grads, loss = vmap(gradient, in_dims=(shared, 0, 0))(params, x, target)
        return (loss, *unpack(grads), None, None)
    in_dims = (shared, 0, 0, 0)
    try:
        (grads, loss), (products, _) = vmap(forward_over_reverse, in_dims)(params, x, target, direction)
    except (RuntimeError, NotImplementedError) as error:
        if "ZeroTensors are immutable" not in str(error) and "jvp" not in str(error):
            raise
        try:
            (grads, loss), products = vmap(reverse_over_reverse, in_dims)(params, x, target, direction)
        except RuntimeError:
            # vmap of reverse-over-reverse through a custom op's autograd.Function
            # trips an internal assertion of PyTorch 2.13: one task at a time.
            (grads, loss), products = vmap(reverse_over_reverse, in_dims, True)(params, x, target, direction)
    return (loss, *unpack(grads), *unpack(products))


def batched_hvp(
    module: nn.Module,
    params: Dict[str, torch.Tensor],
    vector: Dict[str, torch.Tensor],
    x: torch.Tensor,
    target: torch.Tensor,
    loss: Loss = "mse",
):
    """Per-task Hessian-vector products of a per-task loss, for any module.

    Args:
        module: the learner; its parameters give the names and shapes.
        params: per-task parameters, ``{name: [T, *shape]}`` (as from
            ``torch.func.stack_module_state``).
        vector: the vectors, like ``params``.
        x, target: ``[T, ...]`` inputs and targets.
        loss: ``"mse"``, ``"cross_entropy"`` or ``loss(outputs, targets)``.

    Returns:
        ``(loss [T], grad, hvp)``: the loss, its gradient and the product of
        its Hessian with ``vector``, gradients as dicts like ``params``.
        Computed through torch.func (forward-over-reverse), vmapped over tasks.
    """
    names = [name for name, _ in module.named_parameters()]
    if not names:
        raise ValueError("batched_hvp: the module has no parameters")
    if set(params) != set(names) or set(vector) != set(names):
        raise ValueError(
            f"batched_hvp: params and vector must have the module's parameter names "
            f"{names}; got {sorted(params)} and {sorted(vector)}"
        )
    T = x.shape[0]
    for name in names:
        for what, t in (("params", params[name]), ("vector", vector[name])):
            if t.dim() == 0 or t.shape[0] != T:
                raise ValueError(
                    f"batched_hvp: {what}[{name!r}] must be [T = {T}, ...] like x, got shape {list(t.shape)}"
                )
    flat = torch.cat([params[n].reshape(T, -1) for n in names], 1)
    direction = torch.cat([vector[n].reshape(T, -1) for n in names], 1)
    value, grad, _, hvp, _ = module_derivatives(module, loss)(flat, x, target, direction)
    return value, flat_to_dict(module, grad), flat_to_dict(module, hvp)


def _per_task(params: torch.Tensor, tasks: int) -> torch.Tensor:
    """Adapted parameters ``[T, P]``: as computed after a step, a copy of the
    shared ``[P]`` before any."""
    return params if params.dim() == 2 else params.expand(tasks, -1).clone()


class _InnerLoop(torch.autograd.Function):
    """Query losses after K inner steps; the backward is the reverse recursion."""

    @staticmethod
    def forward(ctx, derivatives, steps, first_order, lr, x_s, y_s, x_q, y_q, *parts):
        # theta_0 [P], shared by every task until the first step: the parts
        # flattened here, so that autograd has no node per part.
        theta = parts[0] if len(parts) == 1 and parts[0].dim() == 1 else torch.cat([p.reshape(-1) for p in parts])
        # Detached parts: their shapes and dtypes for the backward (not the
        # tensors themselves, which may belong to the graph).
        ctx.parts = [p.detach() for p in parts]
        # Second order keeps theta_0 .. theta_{K-1} and recomputes the support
        # gradients in the backward; first order keeps only the gradients.
        kept = []
        for _ in range(steps):
            _, grad, *_ = derivatives(theta, x_s, y_s)
            kept.append(grad if first_order else theta)
            theta = torch.addcmul(theta, lr, grad, value=-1)
        loss, grad_q, grad_x_q, _, _ = derivatives(theta, x_q, y_q, input_grad=ctx.needs_input_grad[6])
        ctx.derivatives, ctx.steps, ctx.first_order = derivatives, steps, first_order
        ctx.save_for_backward(lr, x_s, y_s, grad_q, grad_x_q if grad_x_q is not None else x_q.new_empty(0), *kept)
        adapted = _per_task(theta, x_s.shape[0])
        ctx.mark_non_differentiable(adapted)
        return loss, adapted

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, _grad_adapted):
        lr, x_s, y_s, grad_q, grad_x_q, *kept = ctx.saved_tensors
        _, _, _, need_lr, need_x_s, _, need_x_q, _, *need_parts = ctx.needs_input_grad
        # The recursion is linear in each task's query gradient: v starts as
        # the gradient itself and each task's grad_loss is applied at the end.
        v = grad_q
        # With a scalar lr, H (lr v) = lr H v: the product is scaled, v is not copied.
        scalar_lr = lr.dim() == 0
        hvp_scale = lr if scalar_lr else lr.new_ones(())
        d_lr = torch.zeros_like(lr) if need_lr else None
        d_x_s = torch.zeros_like(x_s) if need_x_s and not ctx.first_order else None
        for k in reversed(range(ctx.steps)):
            if ctx.first_order:
                grad = kept[k]
            else:
                _, grad, _, hvp, hvp_x = ctx.derivatives(
                    kept[k], x_s, y_s, v if scalar_lr else lr * v, input_grad=d_x_s is not None
                )
            if need_lr:
                d_lr -= (grad_loss[:, None] * v * grad).sum_to_size(lr.shape)
            if not ctx.first_order:
                v = torch.addcmul(v, hvp, hvp_scale, value=-1)
                if d_x_s is not None:
                    d_x_s.addcmul_(hvp_x, hvp_scale, value=-1)

        def per_task(t):  # each task's rows times its grad_loss
            return t * grad_loss.view(-1, *[1] * (t.dim() - 1))

        d_x_s = per_task(d_x_s) if d_x_s is not None else None
        d_x_q = per_task(grad_x_q) if need_x_q else None
        d_parts = [None] * len(need_parts)
        if any(need_parts):
            d_theta = grad_loss @ v
            # The views of the parts in one C++ call: for six parts, 8 us
            # against 24 us for split and six Python views.
            d_parts = torch._C._nn.unflatten_dense_tensors(d_theta, ctx.parts)
            d_parts = [
                (d if d.dtype == p.dtype else d.to(p.dtype)) if need else None
                for d, p, need in zip(d_parts, ctx.parts, need_parts)
            ]
        return (None, None, None, d_lr, d_x_s, None, d_x_q, None, *d_parts)


def maml_query_loss(
    derivatives,
    theta: Union[torch.Tensor, Sequence[torch.Tensor]],
    lr: torch.Tensor,
    x_support: torch.Tensor,
    y_support: torch.Tensor,
    x_query: torch.Tensor,
    y_query: torch.Tensor,
    steps: int = 1,
    first_order: bool = False,
    return_adapted: bool = False,
):
    """Per-task query losses ``[T]`` after ``steps`` inner gradient steps
    (with ``return_adapted``, also the adapted parameters ``[T, P]``, without
    gradient).

    Every task starts from the flat parameters ``theta [P]`` (or a list of
    tensors, the module's parameters say, flattened in order and each given
    its gradient; cheaper than flattening them first) and takes steps
    ``theta - lr * grad L_support``, ``lr`` a 0-dimensional or ``[P]`` tensor.
    Differentiable with respect to ``theta``, ``lr``, ``x_support`` and
    ``x_query`` through the reverse recursion (module docstring); with
    ``first_order`` the support gradients count as constants (FOMAML).
    Targets get no gradient.
    """
    if y_support.requires_grad or y_query.requires_grad:
        raise ValueError("maml_query_loss: targets that require grad are not supported; detach them")
    # Contiguous once here, not at each of the kernels' calls.
    x_support, y_support, x_query, y_query = (t.contiguous() for t in (x_support, y_support, x_query, y_query))
    parts = (theta,) if isinstance(theta, torch.Tensor) else tuple(theta)
    loss, adapted = _InnerLoop.apply(
        derivatives, int(steps), bool(first_order), lr, x_support, y_support, x_query, y_query, *parts
    )
    return (loss, adapted) if return_adapted else loss


def module_task_forward(module: nn.Module, loss: Loss):
    """``task_forward(params, x, target) -> (loss, outputs)``: one task's
    scalar loss and outputs of ``module`` with ``params`` (a list in
    ``module.parameters()`` order, or flat ``[P]``) on ``x``, batch norm in
    training mode on the task's batch statistics (see
    :func:`batch_statistics`), convolutions channels-last on the CPU
    (:func:`call_with_parameters`).

    ``task_forward.differentiated_twice`` is the same for a forward whose
    graph will be differentiated twice: it keeps the convolutions in the
    default layout, since PyTorch's batch-norm double backward sums
    channels-last tensors over the batch into a default-layout result, a
    strided pass that costs more than the convolutions gain."""
    criterion = loss_function(loss)
    names = [name for name, _ in module.named_parameters()]

    def with_layout(convolutions):
        def task_forward(params, x, target):
            named = flat_to_dict(module, params) if isinstance(params, torch.Tensor) else dict(zip(names, params))
            with batch_statistics(module):
                outputs = call_with_parameters(module, named, (x,), convolutions)
            return criterion(outputs, target), outputs

        return task_forward

    task_forward = with_layout(convolution_weights(module))
    task_forward.differentiated_twice = with_layout(frozenset())
    return task_forward


def _forward_differentiated_twice(task_forward):
    """``task_forward``'s variant for a graph differentiated twice, where it has one."""
    return getattr(task_forward, "differentiated_twice", task_forward)


class _KeptGraphLoop(torch.autograd.Function):
    """Query losses after K inner steps through PyTorch autograd, one task
    after the other: each task's inner steps keep their graph
    (``create_graph``), and its meta-gradient (PyTorch's double backward) is
    taken before the next task starts, so memory holds one task's graph.
    The backward weighs the kept per-task gradients by ``grad_loss``."""

    @staticmethod
    def forward(ctx, task_forward, steps, first_order, graphs, lr, x_s, y_s, x_q, y_q, *params):
        need = ctx.needs_input_grad if graphs else (False,) * len(ctx.needs_input_grad)
        need_lr, need_x_s, need_x_q, need_params = need[4], need[5] and not first_order, need[7], need[9:]
        second_order = not first_order and (any(need_params) or need_lr or need_x_s)
        support_forward = _forward_differentiated_twice(task_forward) if second_order else task_forward
        sizes = [p.numel() for p in params]
        kept = {"params": [], "lr": [], "x_s": [], "x_q": []}
        losses, adapted, outputs = [], [], []
        with torch.enable_grad():
            theta = [p.detach().requires_grad_() for p in params]
            lr_leaf = lr.detach().requires_grad_(need_lr)
            lrs = (
                [lr_leaf] * len(params)
                if lr.dim() == 0
                else [part.view(p.shape) for part, p in zip(lr_leaf.split(sizes), params)]
            )
            for t in range(x_s.shape[0]):
                xs_t = x_s[t].detach().requires_grad_(need_x_s)
                xq_t = x_q[t].detach().requires_grad_(need_x_q)
                fast = theta
                for _ in range(steps):
                    support_loss = support_forward(fast, xs_t, y_s[t])[0]
                    grads = torch.autograd.grad(support_loss, fast, create_graph=second_order, materialize_grads=True)
                    fast = [p - step * g for p, step, g in zip(fast, lrs, grads)]
                loss, output = task_forward(fast, xq_t, y_q[t])
                outputs.append(output.detach())
                wrt = {
                    "params": [p for p, n in zip(theta, need_params) if n],
                    "lr": [lr_leaf] if need_lr else [],
                    "x_s": [xs_t] if need_x_s else [],
                    "x_q": [xq_t] if need_x_q else [],
                }
                flat_wrt = [w for ws in wrt.values() for w in ws]
                if flat_wrt:
                    grads = iter(torch.autograd.grad(loss, flat_wrt, materialize_grads=True))
                    for key, ws in wrt.items():
                        kept[key].append([next(grads) for _ in ws])
                losses.append(loss.detach())
                adapted.append(torch.cat([p.detach().reshape(-1) for p in fast]))
        ctx.parts = [(p.shape, p.dtype) for p in params]
        # per input: its gradients stacked over tasks [T, ...]
        ctx.kept = {key: [torch.stack(g) for g in zip(*per_task)] for key, per_task in kept.items() if per_task}
        adapted, outputs = torch.stack(adapted), torch.stack(outputs)
        ctx.mark_non_differentiable(adapted, outputs)
        return torch.stack(losses), adapted, outputs

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, _grad_adapted, _grad_outputs):
        def weighed(key):  # each task's gradient times its grad_loss, summed over tasks
            return [torch.tensordot(grad_loss.to(g.dtype), g, dims=1) for g in ctx.kept.get(key, [])]

        def per_task(key):  # each task's rows times its grad_loss
            return [g * grad_loss.view(-1, *[1] * (g.dim() - 1)) for g in ctx.kept.get(key, [])]

        need_params = ctx.needs_input_grad[9:]
        d_params = iter(weighed("params"))
        d_parts = [next(d_params).to(dtype) if need else None for need, (_, dtype) in zip(need_params, ctx.parts)]
        d_lr, d_x_s, d_x_q = (next(iter(found), None) for found in (weighed("lr"), per_task("x_s"), per_task("x_q")))
        return (None, None, None, None, d_lr, d_x_s, None, d_x_q, None, *d_parts)


def kept_graph_query_loss(
    task_forward,
    params: Sequence[torch.Tensor],
    lr: torch.Tensor,
    x_support: torch.Tensor,
    y_support: torch.Tensor,
    x_query: torch.Tensor,
    y_query: torch.Tensor,
    steps: int = 1,
    first_order: bool = False,
    return_adapted: bool = False,
):
    """:func:`maml_query_loss` through PyTorch autograd, task by task, each
    task's inner graph kept until its meta-gradient is taken (in this call,
    where gradients are enabled): faster than recomputing the inner steps
    where each task's products are large (a convolutional learner), with
    memory of one task's graph. ``task_forward(params, x, target) -> (loss,
    outputs)`` is one task's (:func:`module_task_forward`; its
    ``differentiated_twice`` attribute, where it has one, runs the support
    forwards of second-order inner steps); ``params`` a list of tensors,
    ``lr`` 0-dimensional or flat ``[P]`` over them. With ``return_adapted``,
    returns ``(losses, adapted [T, P], query outputs [T, Q, ...])``, the last
    two without gradient."""
    if y_support.requires_grad or y_query.requires_grad:
        raise ValueError("maml_query_loss: targets that require grad are not supported; detach them")
    loss, adapted, outputs = _KeptGraphLoop.apply(
        task_forward,
        int(steps),
        bool(first_order),
        torch.is_grad_enabled(),
        lr,
        x_support,
        y_support,
        x_query,
        y_query,
        *params,
    )
    return (loss, adapted, outputs) if return_adapted else loss


def _proximal_descent(
    derivatives, theta: torch.Tensor, lr: torch.Tensor, lam: float, x_s: torch.Tensor, y_s: torch.Tensor, steps: int
) -> torch.Tensor:
    """iMAML's inner problem: ``steps`` gradient steps on each task's
    L_support(phi) + lam/2 ||phi - theta||^2 from phi = theta; ``[T, P]``."""
    phi = theta
    for _ in range(steps):
        _, grad, *_ = derivatives(phi, x_s, y_s)
        phi = phi - lr * (grad + lam * (phi - theta))
    return phi


def conjugate_gradient(apply, b: torch.Tensor, steps: int) -> torch.Tensor:
    """``steps`` iterations of conjugate gradient on A u = b for each row of
    ``b [T, P]`` (A symmetric positive definite, ``apply(u) = A u`` row by
    row), from u = 0. A row whose residual reaches 0 stays where it is."""
    u = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    rr = (r * r).sum(1, keepdim=True)
    for _ in range(steps):
        ap = apply(p)
        curvature = (p * ap).sum(1, keepdim=True)
        alpha = torch.where(curvature != 0, rr / torch.where(curvature != 0, curvature, 1), 0)
        u = u + alpha * p
        r = r - alpha * ap
        rr_next = (r * r).sum(1, keepdim=True)
        beta = torch.where(rr != 0, rr_next / torch.where(rr != 0, rr, 1), 0)
        p = r + beta * p
        rr = rr_next
    return u


class _ImplicitLoop(torch.autograd.Function):
    """Query losses after the proximal inner problem; the backward is the
    implicit meta-gradient (I + H / lam)^-1 grad L_query(phi), by conjugate
    gradient on Hessian-vector products at phi. Only phi is kept, so memory
    does not grow with the number of inner steps."""

    @staticmethod
    def forward(ctx, derivatives, steps, lam, cg_steps, theta, lr, x_s, y_s, x_q, y_q):
        phi = _proximal_descent(derivatives, theta, lr, lam, x_s, y_s, steps)
        loss, grad_q, *_ = derivatives(phi, x_q, y_q)
        ctx.derivatives, ctx.lam, ctx.cg_steps = derivatives, lam, cg_steps
        ctx.save_for_backward(phi, grad_q, x_s, y_s)
        adapted = _per_task(phi, x_s.shape[0])
        ctx.mark_non_differentiable(adapted)
        return loss, adapted

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, _grad_adapted):
        phi, grad_q, x_s, y_s = ctx.saved_tensors

        def apply(u):  # (I + H(phi) / lam) u, per task
            return u + ctx.derivatives(phi, x_s, y_s, u)[3] / ctx.lam

        v = conjugate_gradient(apply, grad_q * grad_loss[:, None], ctx.cg_steps)
        return None, None, None, None, v.sum(0), None, None, None, None, None


class _KeptImplicitLoop(torch.autograd.Function):
    """:class:`_ImplicitLoop` through PyTorch autograd, one task after the
    other: the proximal steps without a graph, then the support gradient's
    graph at phi kept for the conjugate-gradient steps' Hessian-vector
    products (double backward), and the task's meta-gradient solved before
    the next task starts. Memory holds one task's gradient graph."""

    @staticmethod
    def forward(ctx, task_forward, steps, lam, cg_steps, graphs, theta, lr, x_s, y_s, x_q, y_q):
        def derivatives(phi, x, y):  # one task's loss and gradient, for _proximal_descent
            with torch.enable_grad():
                phi = phi.detach().requires_grad_()
                loss = task_forward(phi, x, y)[0]
                return loss.detach(), torch.autograd.grad(loss, phi, materialize_grads=True)[0]

        hvp_forward = _forward_differentiated_twice(task_forward)  # the support forward of the products
        losses, adapted, outputs, solutions = [], [], [], []
        for t in range(x_s.shape[0]):
            phi = _proximal_descent(derivatives, theta.detach(), lr, lam, x_s[t], y_s[t], steps)
            with torch.enable_grad():
                phi = phi.requires_grad_()
                loss, output = task_forward(phi, x_q[t], y_q[t])
                losses.append(loss.detach())
                adapted.append(phi.detach())
                outputs.append(output.detach())
                if not graphs:
                    continue
                (grad_q,) = torch.autograd.grad(loss, phi, materialize_grads=True)
                support_loss = hvp_forward(phi, x_s[t], y_s[t])[0]
                (grad_s,) = torch.autograd.grad(support_loss, phi, create_graph=True, materialize_grads=True)

                def apply(u):  # (I + H(phi) / lam) u
                    (hvp,) = torch.autograd.grad(grad_s, phi, u[0], retain_graph=True, materialize_grads=True)
                    return u + hvp[None] / lam

                # conjugate gradient is homogeneous in b: grad_loss scales it in the backward
                solutions.append(conjugate_gradient(apply, grad_q[None], cg_steps)[0])
        ctx.solutions = torch.stack(solutions) if solutions else None
        adapted, outputs = torch.stack(adapted), torch.stack(outputs)
        ctx.mark_non_differentiable(adapted, outputs)
        return torch.stack(losses), adapted, outputs

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, _grad_adapted, _grad_outputs):  # only after a forward with gradients enabled
        d_theta = grad_loss.to(ctx.solutions.dtype) @ ctx.solutions
        return None, None, None, None, None, d_theta, None, None, None, None, None


def implicit_query_loss(
    derivatives,
    theta: torch.Tensor,
    lr: torch.Tensor,
    x_support: torch.Tensor,
    y_support: torch.Tensor,
    x_query: torch.Tensor,
    y_query: torch.Tensor,
    steps: int,
    lam: float,
    cg_steps: int,
    return_adapted: bool = False,
):
    """Per-task query losses ``[T]`` (with ``return_adapted``, also each
    task's phi ``[T, P]``, without gradient) of implicit MAML (Rajeswaran et al.
    2019): each task's phi approximately minimises L_support(phi) + lam/2
    ||phi - theta||^2 (``steps`` gradient steps of size ``lr`` from theta),
    and the gradient with respect to ``theta`` is the implicit one, (I + H /
    lam)^-1 grad L_query(phi) with H the support loss's Hessian at phi,
    solved by ``cg_steps`` of conjugate gradient. Only ``theta`` gets a
    gradient (not ``lr``, the inputs or the targets).

    The Hessian-vector products are recomputed at each conjugate-gradient
    step (see :func:`kept_graph_implicit_query_loss` for the alternative)."""
    loss, adapted = _ImplicitLoop.apply(
        derivatives, int(steps), float(lam), int(cg_steps), theta, lr, x_support, y_support, x_query, y_query
    )
    return (loss, adapted) if return_adapted else loss


def kept_graph_implicit_query_loss(
    task_forward,
    theta: torch.Tensor,
    lr: torch.Tensor,
    x_support: torch.Tensor,
    y_support: torch.Tensor,
    x_query: torch.Tensor,
    y_query: torch.Tensor,
    steps: int,
    lam: float,
    cg_steps: int,
    return_adapted: bool = False,
):
    """:func:`implicit_query_loss` through PyTorch autograd, task by task,
    each task's support-gradient graph at phi kept for its
    conjugate-gradient steps, and its meta-gradient solved in this call
    (where gradients are enabled). ``task_forward(theta, x, target) ->
    (loss, outputs)`` is one task's (:func:`module_task_forward`; its
    ``differentiated_twice`` attribute, where it has one, runs the support
    forward of the Hessian-vector products). With ``return_adapted``,
    returns ``(losses, phi [T, P], query outputs [T, Q, ...])``, the last two
    without gradient."""
    loss, adapted, outputs = _KeptImplicitLoop.apply(
        task_forward,
        int(steps),
        float(lam),
        int(cg_steps),
        torch.is_grad_enabled(),
        theta,
        lr,
        x_support,
        y_support,
        x_query,
        y_query,
    )
    return (loss, adapted, outputs) if return_adapted else loss
