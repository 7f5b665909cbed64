"""fastmeta.ops.matching_attention_lstm against its step-by-step reference."""

import pytest
import torch

from fastmeta import ops, reference
from fastmeta.ops.matching_attention_lstm import _composite
from fastmeta.testing import DEVICES, compare_with_reference


def operands(B, Q, S, D, dtype=torch.float64, device="cpu", bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(B, Q, D), (B, S, D), (4 * D, 2 * D), (4 * D, D)] + ([(4 * D,)] if bias else [])
    return [
        (0.5 * torch.randn(*s, generator=g, dtype=torch.float64)).to(device, dtype).requires_grad_() for s in shapes
    ]


SHAPES = [
    (2, 3, 4, 5, None),
    (1, 1, 1, 1, 1),
    (3, 7, 5, 6, 0),
    (2, 0, 3, 4, 2),
    (2, 3, 0, 4, 2),
    (3, 5, 2, 3, 7),
    (1, 300, 20, 64, None),
    (4, 17, 9, 13, 3),
    (2, 301, 5, 3, 2),
]  # several blocks of queries per episode, the last one short


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("B, Q, S, D, steps", SHAPES)
def test_matches_reference_values_and_gradients(device, dtype, B, Q, S, D, steps):
    inputs = operands(B, Q, S, D, dtype, device)
    (out,), _ = compare_with_reference(
        lambda *t: ops.matching_attention_lstm(*t, steps=steps),
        lambda *t: reference.matching_attention_lstm(*t, steps=steps),
        inputs,
    )
    assert out.shape == (B, Q, D) and out.dtype == dtype


@pytest.mark.parametrize("B, Q, S, D, steps", [(2, 3, 4, 5, None), (1, 2, 1, 2, 3), (2, 3, 2, 3, 0)])
def test_gradcheck(B, Q, S, D, steps):
    inputs = operands(B, Q, S, D)
    assert torch.autograd.gradcheck(lambda *t: ops.matching_attention_lstm(*t, steps=steps), inputs)


def test_without_bias_and_the_composite_path_of_other_devices():
    inputs = operands(2, 4, 3, 5, bias=False)
    expected = reference.matching_attention_lstm(*inputs)
    torch.testing.assert_close(ops.matching_attention_lstm(*inputs), expected)
    zeros = torch.zeros(20, dtype=torch.float64)
    torch.testing.assert_close(_composite(*inputs, zeros, 3), expected)


def test_nan_stays_in_its_query():
    query, support, *weights = [t.detach() for t in operands(2, 5, 3, 4)]
    query[1, 2, 0] = float("nan")
    out = ops.matching_attention_lstm(query, support, *weights)
    assert out[1, 2].isnan().all()
    finite = torch.ones(2, 5, dtype=torch.bool)
    finite[1, 2] = False
    torch.testing.assert_close(out[finite], reference.matching_attention_lstm(query, support, *weights)[finite])


def test_opcheck():
    for shape, steps in (((2, 3, 4, 5), 3), ((1, 2, 1, 2), 0)):
        inputs = [t.detach().requires_grad_() for t in operands(*shape)]
        torch.library.opcheck(torch.ops.fastmeta.matching_attention_lstm, (*inputs, steps))


def test_bad_input_messages():
    q, s, wi, wh, b = operands(2, 3, 4, 5)
    with pytest.raises(ValueError, match=r"query must be \[B, Q, D\] and support \[B, S, D\]"):
        ops.matching_attention_lstm(q[0], s, wi, wh, b)
    with pytest.raises(ValueError, match=r"query must be \[B, Q, D\] and support \[B, S, D\]"):
        ops.matching_attention_lstm(q, s[:, :, :4], wi, wh, b)
    with pytest.raises(ValueError, match=r"weight_ih must be \[20, 10\] and weight_hh \[20, 5\]"):
        ops.matching_attention_lstm(q, s, wi[:, :9], wh, b)
    with pytest.raises(ValueError, match=r"bias must be \[20\], got \[19\]"):
        ops.matching_attention_lstm(q, s, wi, wh, b[:19])
    with pytest.raises(ValueError, match="steps must be an integer >= 0, got -1"):
        ops.matching_attention_lstm(q, s, wi, wh, b, steps=-1)
    with pytest.raises(TypeError, match="weight_hh has dtype torch.float32 but query has dtype torch.float64"):
        ops.matching_attention_lstm(q, s, wi, wh.float(), b)
    with pytest.raises(TypeError, match="query must be a floating-point tensor"):
        ops.matching_attention_lstm(q.long(), s, wi, wh, b)
    with pytest.raises(ValueError, match="support is on meta but query is on cpu"):
        ops.matching_attention_lstm(q, s.to("meta"), wi, wh, b)
    with pytest.raises(RuntimeError, match="weight_ih has size 10 in dimension 0 but 4 x the feature size is 20"):
        torch.ops.fastmeta.matching_attention_lstm(q.detach(), s.detach(), wi.detach().T, wh.detach(), b.detach(), 2)
    with pytest.raises(RuntimeError, match="fastmeta: steps must be >= 0, got -2"):
        torch.ops.fastmeta.matching_attention_lstm(q.detach(), s.detach(), wi.detach(), wh.detach(), b.detach(), -2)
