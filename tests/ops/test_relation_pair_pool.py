"""fastmeta.ops.relation_pair_pool against relu(max_pool2d) of each pair's sum."""

import pytest
import torch

from fastmeta import ops, reference
from fastmeta.testing import DEVICES, compare_with_reference


def operands(B, Q, N, H, W, C, dtype=torch.float64, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(B, count, H, W, C, generator=g, dtype=torch.float64).to(device, dtype).requires_grad_()
        for count in (Q, N)
    ]


SHAPES = [
    (1, 3, 2, 7, 7, 64),
    (2, 5, 3, 6, 5, 17),
    (1, 1, 1, 1, 1, 1),
    (3, 2, 4, 2, 3, 9),
    (1, 19, 5, 4, 4, 8),
    (2, 0, 3, 5, 5, 4),
    (1, 3, 0, 5, 5, 4),
    (1, 2, 2, 0, 3, 4),
    (1, 2, 2, 3, 3, 0),
    (2, 4, 20, 9, 11, 33),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("B, Q, N, H, W, C", SHAPES)
def test_matches_reference_values_and_gradients(device, dtype, B, Q, N, H, W, C):
    queries, prototypes = operands(B, Q, N, H, W, C, dtype, device)
    (out,), _ = compare_with_reference(ops.relation_pair_pool, reference.relation_pair_pool, (queries, prototypes))
    assert out.shape == (B, Q, N, (H + 1) // 2, (W + 1) // 2, C) and out.dtype == dtype


def test_ties_send_the_gradient_to_the_first_maximum_as_max_pool2d():
    g = torch.Generator().manual_seed(1)
    queries, prototypes = [torch.randint(-2, 3, (2, n, 5, 6, 3), generator=g).double().requires_grad_() for n in (4, 3)]
    out = ops.relation_pair_pool(queries, prototypes)
    expected = reference.relation_pair_pool(queries, prototypes)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    weights = torch.randn(out.shape, generator=g, dtype=torch.float64)
    for a, b in zip(
        torch.autograd.grad((out * weights).sum(), (queries, prototypes)),
        torch.autograd.grad((expected * weights).sum(), (queries, prototypes)),
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_nan_and_infinity_propagate_as_in_the_reference():
    queries, prototypes = [t.detach() for t in operands(1, 2, 2, 4, 4, 3)]
    queries[0, 0, 1, 1, 2] = float("nan")
    prototypes[0, 1, 2, 3, 0] = float("inf")
    out = ops.relation_pair_pool(queries, prototypes)
    torch.testing.assert_close(out, reference.relation_pair_pool(queries, prototypes), equal_nan=True)
    assert out[0, 0, :, 0, 0, 2].isnan().all() and out[0, :, 1, 1, 1, 0].isinf().all()


@pytest.mark.parametrize("row, column", [(0, 0), (0, 1), (1, 0), (1, 1), (2, 2), (2, 1)])
def test_nan_anywhere_in_a_window_propagates_as_in_max_pool2d(row, column):
    """A NaN at any position of a 2x2 window (and of the last, partial one of
    a 3x3 map) wins over larger values after it, as in max_pool2d."""
    queries, prototypes = torch.zeros(1, 1, 3, 3, 2), torch.full((1, 2, 3, 3, 2), 5.0)
    queries[0, 0, row, column, 1] = float("nan")
    out = ops.relation_pair_pool(queries, prototypes)
    expected = reference.relation_pair_pool(queries, prototypes)
    assert expected[0, 0, :, row // 2, column // 2, 1].isnan().all()
    torch.testing.assert_close(out, expected, equal_nan=True, rtol=0, atol=0)


def test_non_contiguous_inputs():
    queries, prototypes = operands(2, 3, 4, 5, 6, 7)
    q_strided = queries.detach().transpose(2, 3).contiguous().transpose(2, 3).requires_grad_()
    assert not q_strided.is_contiguous()
    torch.testing.assert_close(
        ops.relation_pair_pool(q_strided, prototypes), reference.relation_pair_pool(q_strided, prototypes)
    )


def test_gradcheck_and_gradgradcheck():
    queries, prototypes = operands(2, 3, 2, 5, 3, 4)
    assert torch.autograd.gradcheck(ops.relation_pair_pool, (queries, prototypes))
    assert torch.autograd.gradgradcheck(ops.relation_pair_pool, (queries, prototypes))


def test_opcheck():
    for shape in ((2, 3, 2, 5, 3, 4), (1, 1, 1, 1, 1, 1), (1, 0, 2, 3, 3, 2)):
        torch.library.opcheck(torch.ops.fastmeta.relation_pair_pool, operands(*shape))


def test_bad_input_messages():
    queries, prototypes = operands(2, 3, 4, 5, 5, 6)
    with pytest.raises(
        ValueError,
        match=r"queries must be \[B, Q, H, W, C\] and prototypes "
        r"\[B, N, H, W, C\], got \[3, 5, 5, 6\] and",
    ):
        ops.relation_pair_pool(queries[0], prototypes)
    with pytest.raises(ValueError, match=r"got \[2, 3, 5, 5, 6\] and \[2, 4, 5, 4, 6\]"):
        ops.relation_pair_pool(queries, prototypes[:, :, :, :4])
    with pytest.raises(ValueError, match=r"got \[2, 3, 5, 5, 6\] and \[1, 4, 5, 5, 6\]"):
        ops.relation_pair_pool(queries, prototypes[:1])
    with pytest.raises(TypeError, match="prototypes has dtype torch.float32 but queries has dtype torch.float64"):
        ops.relation_pair_pool(queries, prototypes.float())
    with pytest.raises(TypeError, match="queries must be a floating-point tensor"):
        ops.relation_pair_pool(queries.long(), prototypes)
    with pytest.raises(ValueError, match="prototypes is on meta but queries is on cpu"):
        ops.relation_pair_pool(queries, prototypes.to("meta"))
    with pytest.raises(RuntimeError, match="prototypes has size 4 in dimension 3 but queries' map size is 5"):
        torch.ops.fastmeta.relation_pair_pool(queries.detach(), prototypes.detach()[:, :, :, :4])
    with pytest.raises(RuntimeError, match=r"grad has size 2 in dimension 3 but the output's"):
        torch.ops.fastmeta.relation_pair_pool_backward(
            torch.zeros(2, 3, 4, 2, 3, 6, dtype=torch.float64), queries.detach(), prototypes.detach()
        )
