import torch

from .. import formulas
from . import _common

__all__ = ["relation_pair_pool"]


def relation_pair_pool(queries: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """``relu(max_pool2d(q_i + p_j, 2, ceil_mode=True))`` for every pair of a
    query map ``q_i`` and a prototype map ``p_j`` of each episode, channels
    last, without building the pair maps.

    This is the relation module's first block after its separable first
    convolution and batch norm (:meth:`fastmeta.nn.RelationModule.pair_scores`):
    the ``Q x N`` pair maps are only ever needed pooled, a quarter of their
    size. CPU kernel, forward and backward (the gradient goes to each
    window's first maximal position, as ``max_pool2d``'s); on other devices
    the same computation runs as PyTorch operations.

    Args:
        queries: ``[B, Q, H, W, C]``.
        prototypes: ``[B, N, H, W, C]``.

    Returns:
        ``[B, Q, N, ceil(H / 2), ceil(W / 2), C]``; differentiable in both
        inputs (twice, through the PyTorch formulation).

    Example:
        >>> q, p = torch.randn(1, 10, 7, 7, 64), torch.randn(1, 5, 7, 7, 64)
        >>> fastmeta.ops.relation_pair_pool(q, p).shape
        torch.Size([1, 10, 5, 4, 4, 64])
    """
    op = "relation_pair_pool"
    _common.check_tensor(op, "queries", queries)
    _common.check_tensor(op, "prototypes", prototypes, like=queries, like_name="queries")
    if (
        queries.dim() != 5
        or prototypes.dim() != 5
        or prototypes.shape[0] != queries.shape[0]
        or prototypes.shape[2:] != queries.shape[2:]
    ):
        raise ValueError(
            f"{op}: queries must be [B, Q, H, W, C] and prototypes [B, N, H, W, C], "
            f"got {list(queries.shape)} and {list(prototypes.shape)}"
        )
    if queries.device.type != "cpu":
        return formulas.relation_pair_pool(queries, prototypes)
    dtype = queries.dtype
    compute = _common.compute_dtype(queries)
    return _common.call("relation_pair_pool", queries.to(compute), prototypes.to(compute)).to(dtype)


def _out_shape(queries, prototypes):
    B, Q, H, W, C = queries.shape
    return B, Q, prototypes.shape[1], (H + 1) // 2, (W + 1) // 2, C


def _check_raw(op, queries, prototypes, *others):
    return _common.check_raw_operands(
        op, ("queries", queries, "BQHWC", None), ("prototypes", prototypes, "BNHWC", None), *others
    )


@torch.library.register_fake("fastmeta::relation_pair_pool")
def _(queries, prototypes):
    _check_raw("relation_pair_pool", queries, prototypes)
    return queries.new_empty(_out_shape(queries, prototypes))


@torch.library.register_fake("fastmeta::relation_pair_pool_backward")
def _(grad, queries, prototypes):
    _check_raw("relation_pair_pool_backward", queries, prototypes, ("grad", grad, "BQNIJC", None))
    torch._check(
        tuple(grad.shape) == _out_shape(queries, prototypes),
        lambda: (
            f"fastmeta::relation_pair_pool_backward: grad must be "
            f"{list(_out_shape(queries, prototypes))}, got {list(grad.shape)}"
        ),
    )
    return torch.empty_like(queries), torch.empty_like(prototypes)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad):
    return _common.call("relation_pair_pool_backward", grad, *ctx.saved_tensors)


def _reference_backward(grad, queries, prototypes):
    return _common.reference_vjp(formulas.relation_pair_pool, (queries, prototypes), grad)


_common.register_autograd("relation_pair_pool", _backward, _setup_context)
_common.register_reference_double_backward("relation_pair_pool_backward", _reference_backward)
