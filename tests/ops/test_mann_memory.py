"""fastmeta.ops.mann_memory and fastmeta.nn.MANN against their step-by-step
eager formulations."""

import pytest
import torch

from fastmeta import nn as fnn
from fastmeta import ops, reference
from fastmeta.testing import DEVICES, compare_with_reference


def operands(B, T, S, W, H, dtype=torch.float64, device="cpu", seed=0):
    """Memory, usage, read weights, keys, write gates and key strengths; all
    but the usage require grad."""
    g = torch.Generator().manual_seed(seed)
    tensors = [
        torch.randn(B, S, W, generator=g) * 0.5,
        torch.rand(B, S, generator=g) * 3,
        torch.softmax(torch.randn(B, H, S, generator=g), -1),
        torch.randn(B, T, H, W, generator=g),
        torch.rand(B, T, H, generator=g),
        torch.rand(B, T, H, generator=g) * 4,
    ]
    tensors = [t.to(device, dtype) for t in tensors]
    return [t if i == 1 else t.requires_grad_() for i, t in enumerate(tensors)]


# (B, T, S, W, H): odd sizes, one slot, one head, more heads than slots, B = 0, T = 0
SHAPES = [
    (2, 5, 7, 5, 3),
    (3, 4, 1, 1, 1),
    (1, 6, 5, 3, 6),
    (4, 50, 16, 9, 4),
    (2, 3, 3, 17, 1),
    (0, 4, 5, 3, 2),
    (2, 0, 5, 3, 2),
    (1, 1, 128, 40, 4),
]


def differentiable(args):
    return [args[i] for i in (0, 2, 3, 4, 5)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("B, T, S, W, H", SHAPES)
def test_matches_reference_values_and_gradients(device, dtype, B, T, S, W, H):
    args = operands(B, T, S, W, H, dtype, device)
    slots = None
    if dtype == torch.float32 and T > 0:
        # Rounding can tip a near tie of the usage the other way, and the
        # least-used selection is discrete: compare float32 given its own choices.
        slots = torch.ops.fastmeta.mann_memory(*(t.detach() for t in args), 0.9)[6].cpu()

    def steps_with_the_same_slots(*leaves):
        if slots is None:
            return reference.mann_memory(*leaves, decay=0.9)
        reads, memories, history, usage, _ = reference.mann_steps(*leaves, 0.9, slots=slots)
        return reads, memories[:, -1], usage, history[:, -1]

    out, _ = compare_with_reference(lambda *t: ops.mann_memory(*t, decay=0.9), steps_with_the_same_slots, args)
    assert [o.shape for o in out] == [(B, T, H, W), (B, S, W), (B, S), (B, H, S)]
    assert all(o.dtype == dtype for o in out)


def test_least_used_ties_go_to_the_lowest_slots_and_the_least_used_is_cleared():
    B, S, W, H = 1, 6, 2, 2
    memory = torch.arange(S * W, dtype=torch.float64).view(B, S, W) + 1
    usage = torch.tensor([[3.0, 1.0, 2.0, 1.0, 5.0, 1.0]], dtype=torch.float64)
    keys = torch.zeros(B, 1, H, W, dtype=torch.float64)
    out = ops.mann_memory(
        memory, usage, torch.zeros(B, H, S, dtype=torch.float64), keys, torch.zeros(B, 1, H, dtype=torch.float64)
    )
    # least used: slots 1 and 3 (usage 1, the lowest of the tied), slot 1 cleared
    expected_memory = memory.clone()
    expected_memory[0, 1] = 0
    torch.testing.assert_close(out.memory, expected_memory)
    write = torch.tensor([0, 1, 0, 1, 0, 0], dtype=torch.float64) * H  # both heads write there
    torch.testing.assert_close(out.usage[0], 0.95 * usage[0] + write + out.read_weights[0].sum(0))


def test_continuing_from_the_returned_state_equals_one_call():
    memory, usage, weights, keys, gates, strengths = operands(3, 9, 6, 4, 2)
    whole = ops.mann_memory(memory, usage, weights, keys, gates, strengths)
    first = ops.mann_memory(memory, usage, weights, keys[:, :4], gates[:, :4], strengths[:, :4])
    second = ops.mann_memory(first.memory, first.usage, first.read_weights, keys[:, 4:], gates[:, 4:], strengths[:, 4:])
    torch.testing.assert_close(torch.cat([first.reads, second.reads], 1), whole.reads)
    for a, b in zip(second[1:], whole[1:]):
        torch.testing.assert_close(a, b)
    grads_whole = torch.autograd.grad(whole.reads.sum(), [memory, keys])
    grads_split = torch.autograd.grad(first.reads.sum() + second.reads.sum(), [memory, keys])
    for a, b in zip(grads_split, grads_whole):
        torch.testing.assert_close(a, b)


def test_nan_stays_in_its_episode():
    args = [t.detach() for t in operands(3, 6, 5, 4, 2)]
    args[3][1, 2, 0, 1] = float("nan")
    out = ops.mann_memory(*args)
    assert out.reads[1, 2:].isnan().any() and out.reads[1, :2].isfinite().all()
    for episode in (0, 2):
        assert all(t[episode].isfinite().all() for t in out)
    expected = reference.mann_memory(*args)
    for a, b in zip(out, expected):
        torch.testing.assert_close(a, b, equal_nan=True)


def test_float_key_strength_and_half_precision():
    args = operands(2, 3, 5, 4, 2)
    out = ops.mann_memory(*args[:5], key_strengths=2.5)
    expected = reference.mann_memory(*args[:5], key_strengths=2.5)
    torch.testing.assert_close(out.reads, expected.reads)
    half = ops.mann_memory(*(t.detach().bfloat16() for t in args))
    assert half.reads.dtype == torch.bfloat16
    torch.testing.assert_close(half.reads.double(), ops.mann_memory(*args).reads.detach(), atol=0.05, rtol=0.05)


def test_gradcheck_and_gradgradcheck():
    args = operands(2, 3, 4, 3, 2)
    usage = args[1]

    def fn(memory, weights, keys, gates, strengths):
        out = ops.mann_memory(memory, usage, weights, keys, gates, strengths, decay=0.8)
        return out.reads, out.memory, out.read_weights

    assert torch.autograd.gradcheck(fn, differentiable(args))
    assert torch.autograd.gradgradcheck(fn, differentiable(args))


def test_opcheck():
    for shape in ((2, 3, 5, 4, 2), (1, 1, 1, 1, 1), (0, 2, 3, 2, 1), (2, 4, 3, 2, 5)):
        args = [t.detach().requires_grad_(t.requires_grad) for t in operands(*shape)]
        torch.library.opcheck(torch.ops.fastmeta.mann_memory, (*args, 0.95))


def test_bad_input_messages():
    memory, usage, weights, keys, gates, strengths = [t.detach() for t in operands(2, 3, 5, 4, 2)]
    with pytest.raises(
        ValueError,
        match=r"keys must be \[2, 3, 2, 4\] for memory of shape "
        r"\[2, 5, 4\] and keys of shape \[2, 3, 2, 3\]",
    ):
        ops.mann_memory(memory, usage, weights, keys[..., :3], gates, strengths)
    with pytest.raises(ValueError, match=r"keys must be \[2, 3, 2, 4\] .* got \[1, 3, 2, 4\]"):
        ops.mann_memory(memory, usage, weights, keys[:1], gates, strengths)
    with pytest.raises(ValueError, match=r"write_gates must be \[2, 3, 2\]"):
        ops.mann_memory(memory, usage, weights, keys, gates[:, :2], strengths)
    with pytest.raises(ValueError, match=r"read_weights must be \[2, 2, 5\]"):
        ops.mann_memory(memory, usage, weights[:, :, :4], keys, gates, strengths)
    with pytest.raises(ValueError, match=r"usage must be \[2, 5\]"):
        ops.mann_memory(memory, usage[:, :4], weights, keys, gates, strengths)
    with pytest.raises(ValueError, match=r"memory must be \[B, S, W\] and keys \[B, T, H, W\]"):
        ops.mann_memory(memory[0], usage, weights, keys, gates, strengths)
    with pytest.raises(ValueError, match="at least one slot and keys at least one head, got S = 0"):
        ops.mann_memory(memory[:, :0], usage[:, :0], weights[..., :0], keys, gates, strengths)
    with pytest.raises(TypeError, match="keys has dtype torch.float32 but memory has dtype torch.float64"):
        ops.mann_memory(memory, usage, weights, keys.float(), gates, strengths)
    with pytest.raises(TypeError, match="key_strengths must be a float or a tensor, got str"):
        ops.mann_memory(memory, usage, weights, keys, gates, "2")
    with pytest.raises(RuntimeError, match=r"keys must have shape \[2, 3, 2, 4\]"):
        torch.ops.fastmeta.mann_memory(memory, usage, weights, keys[..., :3], gates, strengths, 0.9)
    with pytest.raises(RuntimeError, match="least_used must hold slots in"):
        out = torch.ops.fastmeta.mann_memory(memory, usage, weights, keys, gates, strengths, 0.9)
        torch.ops.fastmeta.mann_memory_backward(
            torch.zeros_like(keys),
            torch.zeros_like(memory),
            torch.zeros_like(weights),
            memory,
            weights,
            keys,
            gates,
            strengths,
            out[4],
            out[5],
            out[6] + 5,
        )


def mann(dtype=torch.float64, **kwargs):
    torch.manual_seed(0)
    return fnn.MANN(input_size=36, num_classes=5, hidden_size=24, memory_slots=16, memory_width=8, **kwargs).to(dtype)


def episodes(B=3, T=12, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(B, T, 1, 6, 6, generator=g, dtype=dtype), torch.randint(0, 5, (B, T), generator=g)


@pytest.mark.parametrize("heads", [1, 4])
def test_mann_equals_its_step_by_step_formulation(heads):
    model = mann(read_heads=heads)
    x, y = episodes()
    logits = model(x, y)
    expected = reference.mann_logits(model, x, y)
    assert logits.shape == (3, 12, 5)
    torch.testing.assert_close(logits, expected)
    params = list(model.parameters())
    for a, b in zip(
        torch.autograd.grad(model.loss(x, y), params),
        torch.autograd.grad(torch.nn.functional.cross_entropy(expected.flatten(0, 1), y.flatten()), params),
    ):
        torch.testing.assert_close(a, b)


def test_mann_sees_each_label_one_step_late():
    model = mann()
    x, y = episodes(B=1, T=6)
    changed = y.clone()
    changed[0, 3] = (y[0, 3] + 1) % 5
    a, b = model(x, y), model(x, changed)
    torch.testing.assert_close(a[:, :4], b[:, :4])  # step 3's label reaches step 4 first
    assert not torch.allclose(a[:, 4:], b[:, 4:])


def test_a_label_of_minus_one_is_not_shown_and_not_a_target():
    model = mann()
    x, y = episodes(B=2, T=6)
    hidden = y.clone()
    hidden[:, 3] = -1
    zero_label = model.controller_inputs(x, hidden)[:, 4, -5:]
    assert (zero_label == 0).all()
    logits = model(x, hidden)
    keep = hidden.flatten() >= 0
    want = torch.nn.functional.cross_entropy(logits.flatten(0, 1)[keep], y.flatten()[keep])
    torch.testing.assert_close(model.loss(x, hidden), want)
    torch.testing.assert_close(
        model.loss(x, hidden, targets=y), torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())
    )


def test_mann_nan_stays_in_its_episode():
    model = mann()
    x, y = episodes()
    x[1, 4] = float("nan")
    logits = model(x, y)
    assert logits[1, 4:].isnan().all() and logits[[0, 2]].isfinite().all()


def test_mann_bad_input_messages():
    model = mann()
    x, y = episodes()
    with pytest.raises(
        ValueError,
        match=r"labels must be in 0..4 \(num_classes = 5\), or -1 for a "
        r"label not shown; got values in 1..7",
    ):
        model(x, torch.where(y == 0, 7, y))
    with pytest.raises(ValueError, match=r"got values in -2..4"):
        model(x, torch.where(y == 0, -2, y))
    with pytest.raises(
        ValueError,
        match=r"labels must be \[B, T\] = \[3, 12\] like inputs' first two "
        r"dimensions, got \[2, 12\]",
    ):
        model(x, y[:2])
    with pytest.raises(TypeError, match="labels must be integers"):
        model(x, y.double())
    with pytest.raises(
        ValueError,
        match=r"each example must give input_size = 36 features after the "
        r"embedding, got shape \[25\]",
    ):
        model(x[..., :5, :5], y)
    with pytest.raises(ValueError, match="memory_slots must be a positive integer, got 0"):
        fnn.MANN(36, 5, memory_slots=0)


@pytest.mark.parametrize("B, T", [(0, 5), (2, 0), (0, 0)])
def test_mann_on_no_episodes_or_no_steps_gives_empty_logits(B, T):
    model = fnn.MANN(input_size=4, num_classes=3)
    logits = model(torch.zeros(B, T, 4), torch.zeros(B, T, dtype=torch.long))
    assert logits.shape == (B, T, 3)
