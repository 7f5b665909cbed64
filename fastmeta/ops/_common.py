"""Argument checking and op registration shared by the ops in this package."""

import numbers
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch

from .._checks import check_choice, check_integer_labels  # noqa: F401  (used by the ops)

METRICS = ("sqeuclidean", "euclidean", "cosine", "dot")
DISTANCE_METRICS = ("sqeuclidean", "euclidean", "cosine")
REDUCTIONS = ("mean", "sum", "none")
# Computed in float32 on the CPU, where there are no half-precision kernels.
_CPU_UPCAST = (torch.float16, torch.bfloat16)


def check_tensor(
    op: str, name: str, t, like: Optional[torch.Tensor] = None, floating: bool = True, like_name: str = "x"
):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if floating and not t.is_floating_point():
        raise TypeError(f"{op}: {name} must be a floating-point tensor, got dtype {t.dtype}")
    if like is not None:
        if t.device != like.device:
            raise ValueError(
                f"{op}: {name} is on {t.device} but {like_name} is on {like.device}; move them to the same device"
            )
        if floating and t.dtype != like.dtype:
            raise TypeError(f"{op}: {name} has dtype {t.dtype} but {like_name} has dtype {like.dtype}")


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype kernels accumulate in, and return log-sum-exps in."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float32 if t.device.type == "cpu" and t.dtype in _CPU_UPCAST else t.dtype


@dataclass
class MetricOperands:
    """Query and key operands in the ops' canonical batched form."""

    x: torch.Tensor  # [B, Q, D]
    y: torch.Tensor  # [B, N, D]
    scale: torch.Tensor  # [B, Q]
    unbatched: bool
    dtype: torch.dtype  # the dtype results are returned in

    def output(self, t: torch.Tensor) -> torch.Tensor:
        """Returns a result in the caller's form: unbatched and dtype as given."""
        t = t.squeeze(0) if self.unbatched else t
        return t.to(self.dtype)


def metric_operands(
    op: str, x, y, metric: str, scale: Union[float, torch.Tensor] = 1.0, metrics: Sequence[str] = METRICS
) -> MetricOperands:
    check_tensor(op, "x", x)
    check_tensor(op, "y", y, like=x)
    check_choice(op, "metric", metric, metrics)
    if x.dim() not in (2, 3) or y.dim() != x.dim():
        raise ValueError(
            f"{op}: x and y must both be [Q, D] and [N, D], or [B, Q, D] and "
            f"[B, N, D]; got x of shape {tuple(x.shape)} and y of shape {tuple(y.shape)}"
        )
    if x.shape[-1] != y.shape[-1]:
        raise ValueError(f"{op}: feature sizes differ: x has D = {x.shape[-1]} but y has D = {y.shape[-1]}")
    unbatched = x.dim() == 2
    if unbatched:
        x, y = x.unsqueeze(0), y.unsqueeze(0)
    elif x.shape[0] != y.shape[0]:
        raise ValueError(f"{op}: x has B = {x.shape[0]} tasks but y has B = {y.shape[0]}")
    dtype = x.dtype
    work = compute_dtype(x)
    x, y = x.to(work), y.to(work)
    batch_shape = x.shape[:2]
    if isinstance(scale, torch.Tensor):
        check_tensor(op, "scale", scale)
        if scale.device != x.device and (scale.dim() > 0 or scale.device.type == "meta"):
            raise ValueError(f"{op}: scale is on {scale.device} but x is on {x.device}")
        try:
            scale = torch.broadcast_to(scale.to(device=x.device, dtype=work), batch_shape)
        except RuntimeError:
            want = f"[Q] = [{x.shape[1]}]" if unbatched else f"[B, Q] = {list(batch_shape)}"
            raise ValueError(f"{op}: scale of shape {list(scale.shape)} does not broadcast to {want}") from None
    elif isinstance(scale, numbers.Real) and not isinstance(scale, bool):
        scale = torch.full(batch_shape, float(scale), dtype=work, device=x.device)
    else:
        raise TypeError(f"{op}: scale must be a float or a tensor, got {type(scale).__name__}")
    return MetricOperands(x, y, scale, unbatched, dtype)


def check_raw_operands(op: str, *operands) -> dict:
    """The checks of a raw op's fake implementation, as its kernels make them
    (``csrc/operands/``): same device, dtypes, ranks, and sizes that agree.

    Each operand is ``(name, tensor, dims, dtype)``: ``dims`` names each
    dimension with a letter (a digit is a fixed size) and a letter's sizes
    must agree across operands; ``dtype`` is a ``torch.dtype`` or None for the
    dtype of the first operand, which must be floating. Returns the size of
    each letter.
    """
    first_name, first = operands[0][0], operands[0][1]
    torch._check(
        first.is_floating_point(),
        lambda: f"fastmeta::{op}: {first_name} must be a floating-point tensor, got {first.dtype}",
    )
    sizes = {}
    for name, t, dims, dtype in operands:
        want = first.dtype if dtype is None else dtype
        torch._check(
            t.device == first.device,
            lambda: f"fastmeta::{op}: {name} must be on {first.device} like {first_name}, got {t.device}",
        )
        torch._check(t.dtype == want, lambda: f"fastmeta::{op}: {name} must have dtype {want}, got {t.dtype}")
        torch._check(
            t.dim() == len(dims),
            lambda: (
                f"fastmeta::{op}: {name} must have {len(dims)} dimensions "
                f"[{', '.join(dims)}], got shape {list(t.shape)}"
            ),
        )
        for i, (letter, size) in enumerate(zip(dims, t.shape)):
            if letter.isdigit():
                torch._check(
                    size == int(letter),
                    lambda: (
                        f"fastmeta::{op}: {name} must have size {letter} in dimension {i}, got shape {list(t.shape)}"
                    ),
                )
            elif letter in sizes:
                other_name, other = sizes[letter]
                torch._check(
                    size == other,
                    lambda: (
                        f"fastmeta::{op}: {name} has {letter} = {size} in "
                        f"dimension {i} but {other_name} has {letter} = {other}"
                    ),
                )
            else:
                sizes[letter] = (name, size)
    return {letter: size for letter, (_, size) in sizes.items()}


def check_raw_metric(op: str, metric: str, metrics: Sequence[str] = METRICS):
    torch._check(
        metric in metrics,
        lambda: f"fastmeta::{op}: unknown metric {metric!r}; expected one of {', '.join(map(repr, metrics))}",
    )


def register_vmap_over_tasks(op_name: str):
    """vmap rule for an op whose tensor arguments all lead with the task
    dimension B: the vmapped dimension is folded into B, so the kernel runs
    once for the whole batch."""
    op = getattr(torch.ops.fastmeta, op_name).default

    def vmap_rule(info, in_dims, *args):
        size = info.batch_size
        tasks = None
        folded = []
        for arg, dim in zip(args, in_dims):
            if isinstance(arg, torch.Tensor):
                arg = arg.movedim(dim, 0) if dim is not None else arg.expand(size, *arg.shape)
                tasks = arg.shape[1] if tasks is None else tasks
                arg = arg.reshape(size * arg.shape[1], *arg.shape[2:])
            folded.append(arg)
        out = op(*folded)

        def unfold(t):
            return t.reshape(size, tasks, *t.shape[1:])

        if isinstance(out, tuple):
            return tuple(unfold(t) for t in out), tuple(0 for _ in out)
        return unfold(out), 0

    torch.library.register_vmap(op, vmap_rule)


_FUNCTIONS = {}


def register_autograd(op_name: str, backward: Callable, setup_context: Callable):
    """``torch.library.register_autograd`` for ``fastmeta::<op_name>``, and
    the same rule as a ``torch.autograd.Function`` (with ``setup_context``
    and a generated vmap rule), which :func:`call` uses under torch.func's
    transforms: ops registered with ``register_autograd`` do not support
    ``torch.func.grad``, ``vjp`` or ``jacrev`` yet (pytorch/pytorch#168393)."""
    op = getattr(torch.ops.fastmeta, op_name).default
    torch.library.register_autograd(op, backward, setup_context=setup_context)

    class Function(torch.autograd.Function):
        generate_vmap_rule = True

        @staticmethod
        def forward(*args):
            return op(*args)

    Function.setup_context = staticmethod(setup_context)
    Function.backward = staticmethod(backward)
    Function.__name__ = Function.__qualname__ = f"{op_name}_function"
    _FUNCTIONS[op_name] = Function


def functorch_active() -> bool:
    """Whether a torch.func transform (grad, vjp, vmap, ...) is running
    (outside torch.compile's tracing, which handles the ops' own autograd)."""
    return torch._C._functorch.peek_interpreter_stack() is not None and not torch.compiler.is_compiling()


def call_without_autograd(op, *args):
    """``op(*args)``; where no gradient is being recorded (inside an
    ``autograd.Function``'s forward, in a backward without ``create_graph``,
    under ``torch.no_grad``) and no torch.func transform or torch.compile
    tracing is running, straight to its kernel, past the Python autograd
    kernel that ``torch.library.register_autograd`` installs, whose cost
    shows in small ops' steps (the few-shot GNN's)."""
    if torch.is_grad_enabled() or torch.compiler.is_compiling() or functorch_active():
        return op(*args)
    with torch._C._AutoDispatchBelowAutograd():
        return op(*args)


def call(op_name: str, *args):
    """``torch.ops.fastmeta.<op_name>(*args)``; under torch.func's transforms,
    through the op's ``autograd.Function`` (see :func:`register_autograd`)."""
    function = _FUNCTIONS.get(op_name)
    if function is not None and functorch_active():
        return function.apply(*args)
    return call_without_autograd(getattr(torch.ops.fastmeta, op_name), *args)


def register_reference_double_backward(op_name: str, reference_vjp: Callable):
    """Makes a backward op differentiable, for double backward (second-order
    MAML through a fastmeta loss). ``reference_vjp`` takes the backward op's
    arguments and returns its outputs computed with differentiable PyTorch
    operations; the second derivative is taken through it, so it materialises
    the [B, Q, N] similarity matrix, but only while the second backward runs."""

    def setup_context(ctx, inputs, output):
        ctx.tensor_positions = [i for i, a in enumerate(inputs) if isinstance(a, torch.Tensor)]
        ctx.constants = {i: a for i, a in enumerate(inputs) if not isinstance(a, torch.Tensor)}
        ctx.num_inputs = len(inputs)
        ctx.save_for_backward(*(inputs[i] for i in ctx.tensor_positions))

    def backward(ctx, *grads):
        args = [ctx.constants.get(i) for i in range(ctx.num_inputs)]
        for i, t in zip(ctx.tensor_positions, ctx.saved_tensors):
            args[i] = t
        positions = [i for i in ctx.tensor_positions if args[i].is_floating_point()]
        if functorch_active():  # torch.func's transforms: no requires_grad_ or autograd.grad

            def outputs_of(*floating):
                full = list(args)
                for i, t in zip(positions, floating):
                    full[i] = t
                return tuple(reference_vjp(*full))

            outputs, pullback = torch.func.vjp(outputs_of, *(args[i] for i in positions))
            found = pullback(tuple(torch.zeros_like(o) if g is None else g for o, g in zip(outputs, grads)))
        else:
            for i in positions:
                args[i] = args[i].detach().requires_grad_()
            with torch.enable_grad():
                outputs = reference_vjp(*args)
                pairs = [(o, g) for o, g in zip(outputs, grads) if g is not None and o is not None and o.requires_grad]
                found = (
                    torch.autograd.grad(
                        [o for o, _ in pairs], [args[i] for i in positions], [g for _, g in pairs], allow_unused=True
                    )
                    if pairs
                    else [None] * len(positions)
                )
        result = [None] * ctx.num_inputs
        for i, g in zip(positions, found):
            result[i] = g
        return tuple(result)

    register_autograd(op_name, backward, setup_context)


def reference_vjp(fn: Callable, primals: Sequence[torch.Tensor], grad):
    """Gradients of ``fn(*primals)`` with output gradient ``grad`` (a tensor,
    or a tuple for several outputs), kept differentiable (create_graph);
    zeros for primals that fn does not use."""
    if functorch_active():
        _, pullback = torch.func.vjp(fn, *primals)
        return tuple(pullback(grad))
    out = fn(*primals)
    grads = torch.autograd.grad(out, primals, grad, create_graph=True, allow_unused=True)
    return tuple(torch.zeros_like(p) if g is None else g for p, g in zip(primals, grads))
