from typing import Sequence

import torch

from .. import formulas
from . import _common

__all__ = ["gnn_adjacency"]

# The forward keeps the MLP's hidden activations for the backward (which then
# does not recompute them) when they hold at most this many values (16 MiB in
# float32); larger graphs are recomputed tile by tile in the backward.
KEPT_HIDDEN_VALUES = 1 << 22


def _hidden_values(nodes, weights, last_row):
    """Values of the kept hidden activations: every pair's hidden layers
    (csrc/operands/gnn.h)."""
    B, n = nodes.shape[:2]
    pairs = 0 if n < 2 else (n - 1 if last_row else n * (n - 1) // 2)
    return B * pairs * sum(w.shape[0] for w in weights[:-1])


def gnn_adjacency(
    nodes: torch.Tensor,
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor],
    negative_slope: float = 0.01,
    last_row: bool = False,
) -> torch.Tensor:
    """The learned adjacency of few-shot GNNs (Garcia & Bruna 2018), fused:
    ``A[b, i, j] = softmax_{j != i}(mlp(|x_i - x_j|))`` and ``A[b, i, i] = 0``,
    where ``mlp`` is linear layers (``weights[l] [H_l, H_{l-1}]``,
    ``biases[l] [H_l]``, the last with one output) with leaky ReLU between
    them.

    The MLP runs on tiles of node pairs, once per unordered pair (it is
    symmetric), so the ``[B, n, n, F]`` differences an eager implementation
    keeps never exist. When gradients are needed, the forward keeps the
    hidden activations of the unordered pairs for the backward if they hold
    at most ``KEPT_HIDDEN_VALUES`` values; above that the backward recomputes
    each tile, and memory stays that of a tile. CPU and CUDA kernels,
    forward and backward (on CUDA the MLP's layers are cuBLAS products on
    tiles of pairs); on other devices the eager formulation
    (:func:`fastmeta.formulas.gnn_adjacency`) runs. Works under
    ``torch.compile`` and torch.func's ``grad``, ``vjp`` and ``jacrev`` (not
    ``grad`` of ``grad``).

    Args:
        nodes: ``[B, n, F]``, each episode's node features.
        weights, biases: the MLP's layers, ``F -> H_1 -> ... -> 1``.
        negative_slope: the leaky ReLUs' slope (>= 0).
        last_row: compute only the last node's row (its ``n - 1`` pairs);
            the other rows are 0. For models that read only that row, as
            :class:`fastmeta.nn.FewShotGNN`'s last layer reads the query's.

    Returns:
        ``[B, n, n]``, rows summing to 1 over the other nodes (0 for a
        one-node episode, and for every row but the last with
        ``last_row``); differentiable in nodes, weights and biases (twice,
        through the eager formulation).

    Example:
        >>> mlp = [torch.nn.Linear(69, 138), torch.nn.Linear(138, 1)]
        >>> A = fastmeta.ops.gnn_adjacency(torch.randn(32, 6, 69), [m.weight for m in mlp],
        ...                                [m.bias for m in mlp])
        >>> A.shape
        torch.Size([32, 6, 6])
    """
    op = "gnn_adjacency"
    _common.check_tensor(op, "nodes", nodes)
    weights, biases = list(weights), list(biases)
    for name, ts in (("weights", weights), ("biases", biases)):
        for l, t in enumerate(ts):
            _common.check_tensor(op, f"{name}[{l}]", t, like=nodes, like_name="nodes")
    if nodes.dim() != 3:
        raise ValueError(f"{op}: nodes must be [B, n, F], got shape {list(nodes.shape)}")
    if not weights or len(weights) != len(biases):
        raise ValueError(
            f"{op}: weights and biases must be one per layer, at least one; got "
            f"{len(weights)} weights and {len(biases)} biases"
        )
    width = nodes.shape[2]
    for l, (w, b) in enumerate(zip(weights, biases)):
        if w.dim() != 2 or w.shape[1] != width or list(b.shape) != [w.shape[0]]:
            raise ValueError(
                f"{op}: weights[{l}] must be [H, {width}] and biases[{l}] [H] (layer {l} "
                f"takes {width} features), got {list(w.shape)} and {list(b.shape)}"
            )
        width = w.shape[0]
    if width != 1:
        raise ValueError(
            f"{op}: the last layer must have one output, got weights[-1] of shape {list(weights[-1].shape)}"
        )
    if negative_slope < 0:
        raise ValueError(f"{op}: negative_slope must be >= 0, got {negative_slope}")
    if nodes.device.type not in ("cpu", "cuda"):
        return formulas.gnn_adjacency(nodes, weights, biases, negative_slope, last_row)
    layers = (*weights, *biases)
    keep = (
        torch.is_grad_enabled()
        and (nodes.requires_grad or any(t.requires_grad for t in layers))
        and _hidden_values(nodes, weights, last_row) <= KEPT_HIDDEN_VALUES
    )
    dtype = nodes.dtype
    if dtype not in (torch.float32, torch.float64):  # computed in float32
        nodes, layers = nodes.float(), [t.float() for t in layers]
    function = _AdjacencyUnderTransforms if _common.functorch_active() else _Adjacency
    adjacency, _ = function.apply(nodes, float(negative_slope), bool(last_row), keep, len(weights), *layers)
    return adjacency.to(dtype)


def _check_raw(op, nodes, weights, biases, negative_slope):
    sizes = _common.check_raw_operands(op, ("nodes", nodes, "BNF", None))
    torch._check(
        nodes.dtype in (torch.float32, torch.float64),
        lambda: f"fastmeta::{op}: nodes must have dtype float32 or float64, got {nodes.dtype}",
    )
    torch._check(
        len(weights) >= 1 and len(weights) == len(biases),
        lambda: f"fastmeta::{op}: got {len(weights)} weights and {len(biases)} biases",
    )
    torch._check(negative_slope >= 0, lambda: f"fastmeta::{op}: negative_slope must be >= 0")
    width = sizes["F"]
    for l, (w, b) in enumerate(zip(weights, biases)):
        _common.check_raw_operands(
            op, ("nodes", nodes, "BNF", None), (f"weights[{l}]", w, "HI", None), (f"biases[{l}]", b, "H", None)
        )
        torch._check(w.shape[1] == width, lambda: f"fastmeta::{op}: weights[{l}] must have {width} columns")
        width = w.shape[0]
    torch._check(width == 1, lambda: f"fastmeta::{op}: the last layer must have one output")
    return sizes


@torch.library.register_fake("fastmeta::gnn_adjacency")
def _(nodes, weights, biases, negative_slope, last_row, keep_hidden):
    z = _check_raw("gnn_adjacency", nodes, weights, biases, negative_slope)
    return (
        nodes.new_empty(z["B"], z["N"], z["N"]),
        nodes.new_empty(_hidden_values(nodes, weights, last_row) if keep_hidden else 0),
    )


@torch.library.register_fake("fastmeta::gnn_adjacency_backward")
def _(grad, adjacency, hidden, nodes, weights, biases, negative_slope, last_row):
    op = "gnn_adjacency_backward"
    _check_raw(op, nodes, weights, biases, negative_slope)
    for name, t in (("grad", grad), ("adjacency", adjacency)):
        _common.check_raw_operands(op, ("nodes", nodes, "BNF", None), (name, t, "BNN", None))
    _common.check_raw_operands(op, ("nodes", nodes, "BNF", None), ("hidden", hidden, "K", None))
    torch._check(
        hidden.shape[0] in (0, _hidden_values(nodes, weights, last_row)),
        lambda: f"fastmeta::{op}: hidden must be empty or hold the kept hidden activations",
    )
    return (torch.empty_like(nodes), [torch.empty_like(w) for w in weights], [torch.empty_like(b) for b in biases])


def _setup_context(ctx, inputs, output):
    nodes, weights, biases, negative_slope, last_row, _ = inputs
    adjacency, hidden = output
    ctx.mark_non_differentiable(hidden)
    ctx.set_materialize_grads(False)
    ctx.layers = len(weights)
    ctx.negative_slope, ctx.last_row = negative_slope, last_row
    ctx.save_for_backward(adjacency, hidden, nodes, *weights, *biases)


def _backward(ctx, grad, _):
    if grad is None:
        return None, [None] * ctx.layers, [None] * ctx.layers, None, None, None
    adjacency, hidden, nodes, *layers = ctx.saved_tensors
    weights, biases = layers[: ctx.layers], layers[ctx.layers :]
    arguments = (grad, adjacency, hidden, nodes, weights, biases, ctx.negative_slope, ctx.last_row)
    if _common.functorch_active():
        grad_nodes, grad_weights, grad_biases = _BackwardUnderTransforms.apply(*arguments)
    else:
        grad_nodes, grad_weights, grad_biases = _common.call_without_autograd(
            torch.ops.fastmeta.gnn_adjacency_backward, *arguments
        )
    return grad_nodes, grad_weights, grad_biases, None, None, None


def _setup_double(ctx, inputs, output):
    grad, _, _, nodes, weights, biases, negative_slope, last_row = inputs
    ctx.layers = len(weights)
    ctx.negative_slope, ctx.last_row = negative_slope, last_row
    ctx.save_for_backward(grad, nodes, *weights, *biases)


def _double_backward(ctx, grad_grad_nodes, grad_grad_weights, grad_grad_biases):
    """The backward's own gradient, through the eager formulation (it builds
    the [B, n, n, F] differences, only while this runs)."""
    saved = [t.detach().requires_grad_() for t in ctx.saved_tensors]
    grad, nodes, layers = saved[0], saved[1], saved[2:]
    weights, biases = layers[: ctx.layers], layers[ctx.layers :]
    params = [nodes, *weights, *biases]
    cotangents = [
        grad_grad_nodes,
        *(grad_grad_weights or [None] * ctx.layers),
        *(grad_grad_biases or [None] * ctx.layers),
    ]
    with torch.enable_grad():
        adjacency = formulas.gnn_adjacency(nodes, weights, biases, ctx.negative_slope, ctx.last_row)
        first = torch.autograd.grad(adjacency, params, grad, create_graph=True, allow_unused=True)
        pairs = [(f, c) for f, c in zip(first, cotangents) if f is not None and c is not None and f.requires_grad]
        found = (
            torch.autograd.grad([f for f, _ in pairs], saved, [c for _, c in pairs], allow_unused=True)
            if pairs
            else [None] * len(saved)
        )
    found = list(found)
    return (found[0], None, None, found[1], found[2 : 2 + ctx.layers], found[2 + ctx.layers :], None, None)


def _op_inputs(nodes, negative_slope, last_row, keep_hidden, layers, *tensors):
    """The op's arguments from :class:`_Adjacency`'s, whose layers are separate tensors."""
    return nodes, tensors[:layers], tensors[layers:], negative_slope, last_row, keep_hidden


class _Adjacency(torch.autograd.Function):
    """The op with the autograd rule registered for it, for :func:`gnn_adjacency`:
    it costs less per call than the op's registered autograd, which matters
    at the GNN's small sizes. An ``autograd.Function`` tracks
    only tensor arguments, so it takes the layers as separate tensors; its
    forward takes ``ctx`` (a separate ``setup_context`` would make ``apply``
    bind the arguments to the signature at every call)."""

    @staticmethod
    def forward(ctx, *args):
        inputs = _op_inputs(*args)
        output = _common.call_without_autograd(torch.ops.fastmeta.gnn_adjacency, *inputs)
        _setup_context(ctx, inputs, output)
        return output

    @staticmethod
    def backward(ctx, grad, grad_hidden):
        grad_nodes, grad_weights, grad_biases, *_ = _backward(ctx, grad, grad_hidden)
        return grad_nodes, None, None, None, None, *grad_weights, *grad_biases


class _AdjacencyUnderTransforms(torch.autograd.Function):
    """:class:`_Adjacency` in the form torch.func's transforms require:
    ``setup_context`` apart from ``forward``."""

    @staticmethod
    def forward(*args):
        return torch.ops.fastmeta.gnn_adjacency(*_op_inputs(*args))

    @staticmethod
    def setup_context(ctx, inputs, output):
        _setup_context(ctx, _op_inputs(*inputs), output)

    backward = staticmethod(_Adjacency.backward)


class _BackwardUnderTransforms(torch.autograd.Function):
    """The backward op inside :class:`_AdjacencyUnderTransforms`' backward:
    torch.func's transforms differentiate once (``grad``, ``vjp``), not
    twice."""

    @staticmethod
    def forward(*args):
        return torch.ops.fastmeta.gnn_adjacency_backward(*args)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def vmap(info, in_dims, *args):
        """One backward per index of the mapped dimension (as ``jacrev``
        maps over the output's entries)."""

        def select(arg, dim, k):
            if isinstance(arg, (list, tuple)):
                return [select(a, d, k) for a, d in zip(arg, dim)]
            return arg if dim is None else arg.select(dim, k)

        slices = [
            torch.ops.fastmeta.gnn_adjacency_backward(*(select(a, d, k) for a, d in zip(args, in_dims)))
            for k in range(info.batch_size)
        ]
        grad_nodes, grad_weights, grad_biases = zip(*slices)
        layers = len(grad_weights[0])
        return (
            (
                torch.stack(grad_nodes),
                [torch.stack([g[l] for g in grad_weights]) for l in range(layers)],
                [torch.stack([g[l] for g in grad_biases]) for l in range(layers)],
            ),
            (0, [0] * layers, [0] * layers),
        )

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(
            "gnn_adjacency: second derivatives under torch.func's transforms are not "
            "supported; take them with torch.autograd.grad(..., create_graph=True)"
        )


torch.library.register_autograd("fastmeta::gnn_adjacency", _backward, setup_context=_setup_context)
torch.library.register_autograd("fastmeta::gnn_adjacency_backward", _double_backward, setup_context=_setup_double)
