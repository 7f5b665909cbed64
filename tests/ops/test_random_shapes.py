"""Property tests: fresh random shapes and inputs, against the reference."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastmeta import ops, reference
from fastmeta.testing import DEVICES, assert_close_to_reference

shapes = st.tuples(st.integers(0, 3), st.integers(0, 80), st.integers(1, 700), st.integers(1, 40))


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=25, deadline=None)
@given(
    shape=shapes,
    metric=st.sampled_from(["sqeuclidean", "euclidean", "cosine", "dot"]),
    scale=st.floats(0.05, 4.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_cross_entropy_and_log_softmax(device, shape, metric, scale, seed):
    B, Q, N, D = shape
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, Q, D, generator=g, dtype=torch.float64).to(device).requires_grad_()
    y = torch.randn(B, N, D, generator=g, dtype=torch.float64).to(device).requires_grad_()
    target = torch.randint(0, N, (B, Q), generator=g).to(device)
    got = ops.similarity_cross_entropy(x, y, target, metric, scale, "sum")
    want = reference.similarity_cross_entropy(x, y, target, metric, scale, "sum")
    assert_close_to_reference(got, want)
    for a, b in zip(torch.autograd.grad(got, (x, y)), torch.autograd.grad(want, (x, y))):
        assert_close_to_reference(a, b)
    assert_close_to_reference(
        ops.similarity_log_softmax(x, y, metric, scale), reference.similarity_log_softmax(x, y, metric, scale)
    )
