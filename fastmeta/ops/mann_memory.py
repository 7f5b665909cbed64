import numbers
from typing import NamedTuple, Union

import torch

from .. import formulas
from . import _common

__all__ = ["mann_memory", "MannMemoryOutput"]


class MannMemoryOutput(NamedTuple):
    reads: torch.Tensor  # [B, T, H, W]
    memory: torch.Tensor  # [B, S, W] after the last step
    usage: torch.Tensor  # [B, S] after the last step (no gradient)
    read_weights: torch.Tensor  # [B, H, S] after the last step


def mann_memory(
    memory: torch.Tensor,
    usage: torch.Tensor,
    read_weights: torch.Tensor,
    keys: torch.Tensor,
    write_gates: torch.Tensor,
    key_strengths: Union[float, torch.Tensor] = 1.0,
    decay: float = 0.95,
) -> MannMemoryOutput:
    """T steps of MANN's least-recently-used-access memory (Santoro et al.
    2016), fused: one kernel call for the whole sequence, batched over
    episodes (CPU and CUDA kernels, forward and backward).

    At each step ``t``, with the ``H`` heads' keys ``k``, write gates ``g``
    (in (0, 1), e.g. ``sigmoid(alpha)``) and key strengths ``beta``:

    - the ``min(H, S)`` least-used slots ``lu`` of the usage (ties to the
      lower slot, NaN as most used); the least used of them is zeroed;
    - write weights ``w = g r_prev + (1 - g) 1_lu``; ``M += sum_h w k^T``;
    - read weights ``r = softmax(beta cos(k, M))``, reads ``r M``;
    - usage ``u = decay u + sum_h (r + w)``.

    The least-used selection, and so the usage, has no gradient, as in the
    paper; reads, memory and read weights are differentiable (twice, through
    :func:`fastmeta.formulas.mann_memory`) in the memory, read weights,
    keys, gates and strengths.

    Args:
        memory: ``[B, S, W]``, S slots of width W.
        usage: ``[B, S]``.
        read_weights: the previous step's read weights ``[B, H, S]``.
        keys: ``[B, T, H, W]``, one key per step and head (also written).
        write_gates: ``[B, T, H]``.
        key_strengths: ``[B, T, H]`` or a float.
        decay: the usage decay ``gamma``.

    Returns:
        :class:`MannMemoryOutput`: ``reads [B, T, H, W]`` and the memory,
        usage and read weights after the last step (the state to continue
        from).

    Example:
        >>> B, S, W, H, T = 16, 128, 40, 4, 50
        >>> out = fastmeta.ops.mann_memory(torch.full((B, S, W), 1e-6), torch.zeros(B, S),
        ...                                torch.zeros(B, H, S), keys, torch.sigmoid(alpha))
        >>> out.reads.shape
        torch.Size([16, 50, 4, 40])
    """
    op = "mann_memory"
    _common.check_tensor(op, "memory", memory)
    for name, t in (("usage", usage), ("read_weights", read_weights), ("keys", keys), ("write_gates", write_gates)):
        _common.check_tensor(op, name, t, like=memory, like_name="memory")
    if memory.dim() != 3 or keys.dim() != 4:
        raise ValueError(
            f"{op}: memory must be [B, S, W] and keys [B, T, H, W], got {list(memory.shape)} and {list(keys.shape)}"
        )
    B, S, W = memory.shape
    T, H = keys.shape[1], keys.shape[2]
    if not isinstance(key_strengths, torch.Tensor):
        if isinstance(key_strengths, bool) or not isinstance(key_strengths, numbers.Real):
            raise TypeError(f"{op}: key_strengths must be a float or a tensor, got {type(key_strengths).__name__}")
        key_strengths = torch.full_like(write_gates, float(key_strengths))
    _common.check_tensor(op, "key_strengths", key_strengths, like=memory, like_name="memory")
    for name, t, want in (
        ("keys", keys, [B, T, H, W]),
        ("usage", usage, [B, S]),
        ("read_weights", read_weights, [B, H, S]),
        ("write_gates", write_gates, [B, T, H]),
        ("key_strengths", key_strengths, [B, T, H]),
    ):
        if list(t.shape) != want:
            raise ValueError(
                f"{op}: {name} must be {want} for memory of shape {list(memory.shape)} "
                f"and keys of shape {list(keys.shape)} ([B, S, W] and [B, T, H, W]), "
                f"got {list(t.shape)}"
            )
    if S == 0 or H == 0:
        raise ValueError(f"{op}: memory needs at least one slot and keys at least one head, got S = {S} and H = {H}")
    if T == 0:
        return MannMemoryOutput(keys.new_zeros(B, 0, H, W), memory, usage, read_weights)
    dtype = memory.dtype
    work = torch.float64 if dtype == torch.float64 else torch.float32
    reads, memory, read_weights, usage, *_ = _common.call(
        "mann_memory",
        *(t.to(work) for t in (memory, usage.detach(), read_weights, keys, write_gates, key_strengths)),
        float(decay),
    )
    return MannMemoryOutput(reads.to(dtype), memory.to(dtype), usage.to(dtype), read_weights.to(dtype))


def _check_raw(op, memory, read_weights, keys, write_gates, key_strengths, *others):
    sizes = _common.check_raw_operands(
        op,
        ("memory", memory, "BSW", None),
        ("read_weights", read_weights, "BHS", None),
        ("keys", keys, "BTHW", None),
        ("write_gates", write_gates, "BTH", None),
        ("key_strengths", key_strengths, "BTH", None),
        *others,
    )
    torch._check(
        memory.dtype in (torch.float32, torch.float64),
        lambda: f"fastmeta::{op}: memory must have dtype float32 or float64, got {memory.dtype}",
    )
    torch._check(
        sizes["S"] >= 1 and sizes["H"] >= 1,
        lambda: f"fastmeta::{op}: memory must have at least one slot and keys at least one head",
    )
    return sizes


@torch.library.register_fake("fastmeta::mann_memory")
def _(memory, usage, read_weights, keys, write_gates, key_strengths, decay):
    z = _check_raw("mann_memory", memory, read_weights, keys, write_gates, key_strengths, ("usage", usage, "BS", None))
    B, T, S, W, H = z["B"], z["T"], z["S"], z["W"], z["H"]
    return (
        memory.new_empty(B, T, H, W),
        memory.new_empty(B, S, W),
        memory.new_empty(B, H, S),
        memory.new_empty(B, S),
        memory.new_empty(B, T, S, W),
        memory.new_empty(B, T, H, S),
        memory.new_empty(B, T, min(H, S), dtype=torch.long),
    )


@torch.library.register_fake("fastmeta::mann_memory_backward")
def _(
    grad_reads,
    grad_memory,
    grad_read_weights,
    memory,
    read_weights,
    keys,
    write_gates,
    key_strengths,
    memories,
    read_weight_history,
    least_used,
):
    z = _check_raw(
        "mann_memory_backward",
        memory,
        read_weights,
        keys,
        write_gates,
        key_strengths,
        ("grad_memory", grad_memory, "BSW", None),
        ("grad_read_weights", grad_read_weights, "BHS", None),
        ("grad_reads", grad_reads, "BTHW", None),
        ("memories", memories, "BTSW", None),
        ("read_weight_history", read_weight_history, "BTHS", None),
        ("least_used", least_used, "BTL", torch.long),
    )
    torch._check(
        z["L"] == min(z["H"], z["S"]),
        lambda: (
            f"fastmeta::mann_memory_backward: least_used must have min(H, S) = "
            f"{min(z['H'], z['S'])} slots per step, got {z['L']}"
        ),
    )
    return (
        torch.empty_like(memory),
        torch.empty_like(read_weights),
        torch.empty_like(keys),
        torch.empty_like(write_gates),
        torch.empty_like(key_strengths),
    )


def _setup_context(ctx, inputs, output):
    memory, _, read_weights, keys, write_gates, key_strengths, _ = inputs
    _, _, _, usage_out, memories, history, least_used = output
    ctx.mark_non_differentiable(usage_out, memories, history, least_used)
    ctx.set_materialize_grads(False)  # no [B, T, S, W] of zeros for the saved memories
    ctx.save_for_backward(memory, read_weights, keys, write_gates, key_strengths, memories, history, least_used)


def _backward(ctx, grad_reads, grad_memory, grad_read_weights, *_):
    memory, read_weights, keys, write_gates, key_strengths, memories, history, least_used = ctx.saved_tensors
    grads = [
        torch.zeros_like(like) if g is None else g
        for g, like in ((grad_reads, keys), (grad_memory, memory), (grad_read_weights, read_weights))
    ]
    g_memory, g_weights, g_keys, g_gates, g_strengths = _common.call(
        "mann_memory_backward",
        *grads,
        memory,
        read_weights,
        keys,
        write_gates,
        key_strengths,
        memories,
        history,
        least_used,
    )
    return g_memory, None, g_weights, g_keys, g_gates, g_strengths, None


def _reference_backward(
    grad_reads,
    grad_memory,
    grad_read_weights,
    memory,
    read_weights,
    keys,
    write_gates,
    key_strengths,
    memories,
    read_weight_history,
    least_used,
):
    """The backward op's outputs as differentiable PyTorch operations: the
    steps rerun with the recorded least-used slots."""
    primals = (memory, read_weights, keys, write_gates, key_strengths)
    if keys.shape[1] == 0:
        return grad_memory, grad_read_weights, *(torch.zeros_like(p) for p in primals[2:])

    def steps(memory, read_weights, keys, write_gates, key_strengths):
        reads, memories, history, _, _ = formulas.mann_steps(
            memory,
            memory.new_zeros(memory.shape[:2]),
            read_weights,
            keys,
            write_gates,
            key_strengths,
            0.0,
            slots=least_used,
        )
        return reads, memories[:, -1], history[:, -1]

    return _common.reference_vjp(steps, primals, (grad_reads, grad_memory, grad_read_weights))


_common.register_autograd("mann_memory", _backward, _setup_context)
_common.register_reference_double_backward("mann_memory_backward", _reference_backward)
