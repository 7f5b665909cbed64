"""The similarity ops against fastmeta.reference: values and gradients."""

import pytest
import torch

from fastmeta import ops, reference
from fastmeta.testing import DEVICES, assert_close_to_reference, compare_with_reference, dtypes_for, randn

METRICS = ["sqeuclidean", "euclidean", "cosine", "dot"]
# (B, Q, N, D): size-1 dimensions, sizes that do not divide the CPU tiles
# (blocks of 64 to 256 queries, 512 keys), several blocks of 256 queries and
# several key tiles, few keys over widths that do not divide a vector, and
# empty dimensions.
SHAPES = [
    (1, 1, 1, 1),
    (2, 3, 5, 7),
    (3, 65, 513, 17),
    (1, 70, 1100, 5),
    (2, 1100, 300, 9),
    (2, 19, 20, 37),
    (0, 4, 5, 3),
    (2, 0, 6, 4),
    (2, 3, 4, 0),
]
DEVICE_DTYPES = [(d, t) for d in DEVICES for t in dtypes_for(d)]


def make_inputs(B, Q, N, D, dtype, device, batched=True):
    shape = (lambda *s: s) if batched else (lambda *s: s[1:])
    x = randn(*shape(B, Q, D), dtype=dtype, device=device, requires_grad=True)
    y = randn(*shape(B, N, D), dtype=dtype, device=device, requires_grad=True)
    scale = (0.5 + torch.rand(*shape(B, Q), dtype=torch.float64)).to(device, dtype).requires_grad_()
    return x, y, scale


def compare(fast_fn, ref_fn, inputs, dtype):
    out, _ = compare_with_reference(fast_fn, ref_fn, inputs)
    assert out[0].dtype == dtype


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("metric", ["sqeuclidean", "euclidean", "cosine"])
def test_pairwise_distance(device, dtype, shape, metric):
    x, y, _ = make_inputs(*shape, dtype, device)
    compare(
        lambda x, y: ops.pairwise_distance(x, y, metric),
        lambda x, y: reference.pairwise_distance(x, y, metric),
        (x, y),
        dtype,
    )


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("metric", METRICS)
def test_similarity_log_softmax(device, dtype, shape, metric):
    x, y, scale = make_inputs(*shape, dtype, device)
    compare(
        lambda x, y, s: ops.similarity_log_softmax(x, y, metric, s),
        lambda x, y, s: reference.similarity_log_softmax(x, y, metric, s),
        (x, y, scale),
        dtype,
    )


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("shape", [s for s in SHAPES if s[2] > 0])
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_similarity_cross_entropy(device, dtype, shape, metric, reduction):
    B, Q, N, D = shape
    x, y, scale = make_inputs(*shape, dtype, device)
    target = torch.randint(0, N, (B, Q), device=device)
    compare(
        lambda x, y, s: ops.similarity_cross_entropy(x, y, target, metric, s, reduction),
        lambda x, y, s: reference.similarity_cross_entropy(x, y, target, metric, s, reduction),
        (x, y, scale),
        dtype,
    )


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("metric", METRICS)
def test_attention_readout(device, dtype, shape, metric):
    B, Q, N, D = shape
    x, y, scale = make_inputs(*shape, dtype, device)
    values = randn(B, N, 6, dtype=dtype, device=device, requires_grad=True)
    compare(
        lambda x, y, v, s: ops.attention_readout(x, y, v, metric, s),
        lambda x, y, v, s: reference.attention_readout(x, y, v, metric, s),
        (x, y, values, scale),
        dtype,
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("metric", METRICS)
def test_unbatched_inputs_and_float_scale(device, metric):
    x, y, _ = make_inputs(1, 9, 13, 4, torch.float64, device, batched=False)
    target = torch.randint(0, 13, (9,), device=device)
    values = randn(13, 3, dtype=torch.float64, device=device, requires_grad=True)
    cases = [
        (
            lambda x, y: ops.similarity_log_softmax(x, y, metric, 2.5),
            lambda x, y: reference.similarity_log_softmax(x, y, metric, 2.5),
            (x, y),
        ),
        (
            lambda x, y: ops.similarity_cross_entropy(x, y, target, metric, 0.7),
            lambda x, y: reference.similarity_cross_entropy(x, y, target, metric, 0.7),
            (x, y),
        ),
        (
            lambda x, y, v: ops.attention_readout(x, y, v, metric, 3.0),
            lambda x, y, v: reference.attention_readout(x, y, v, metric, 3.0),
            (x, y, values),
        ),
    ]
    if metric != "dot":
        cases.append(
            (
                lambda x, y: ops.pairwise_distance(x, y, metric),
                lambda x, y: reference.pairwise_distance(x, y, metric),
                (x, y),
            )
        )
    for fast_fn, ref_fn, inputs in cases:
        compare(fast_fn, ref_fn, inputs, torch.float64)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scale_shape", [(), (1,), (4, 1), (1, 7), (4, 7)])
def test_scale_broadcasts_to_tasks_and_queries(device, scale_shape):
    x, y, _ = make_inputs(4, 7, 5, 3, torch.float64, device)
    scale = (1 + torch.rand(scale_shape, dtype=torch.float64, device=device)).requires_grad_()
    target = torch.randint(0, 5, (4, 7), device=device)
    compare(
        lambda x, y, s: ops.similarity_cross_entropy(x, y, target, "cosine", s),
        lambda x, y, s: reference.similarity_cross_entropy(x, y, target, "cosine", s),
        (x, y, scale),
        torch.float64,
    )


@pytest.mark.parametrize("device", DEVICES)
def test_euclidean_gradient_is_zero_where_distance_is_zero(device):
    x = randn(1, 3, 4, dtype=torch.float64, device=device, requires_grad=True)
    y = x.detach().clone().requires_grad_()
    d = ops.pairwise_distance(x, y, "euclidean")
    assert torch.all(d.diagonal(dim1=1, dim2=2) == 0)
    gx, gy = torch.autograd.grad(d.diagonal(dim1=1, dim2=2).sum(), (x, y))
    assert torch.all(gx == 0) and torch.all(gy == 0)
    cdist_grad = torch.autograd.grad(torch.cdist(x, y).diagonal(dim1=1, dim2=2).sum(), x)[0]
    assert torch.equal(gx, cdist_grad)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("metric", METRICS)
def test_nan_in_a_query_row_stays_in_that_row(device, metric):
    x, y, scale = make_inputs(2, 5, 7, 3, torch.float32, device)
    x = x.detach().clone()
    x[1, 2, 0] = float("nan")
    target = torch.randint(0, 7, (2, 5), device=device)
    values = randn(2, 7, 4, device=device)
    outputs = [
        ops.similarity_log_softmax(x, y, metric, scale),
        ops.similarity_cross_entropy(x, y, target, metric, scale, reduction="none"),
        ops.attention_readout(x, y, values, metric, scale),
    ]
    if metric != "dot":
        outputs.append(ops.pairwise_distance(x, y, metric))
    for out in outputs:
        nan_rows = torch.isnan(out.reshape(2, 5, -1)).any(-1)
        expected = torch.zeros(2, 5, dtype=torch.bool, device=device)
        expected[1, 2] = True
        assert torch.equal(nan_rows, expected)
        assert torch.isnan(out.reshape(2, 5, -1)[1, 2]).all()


@pytest.mark.parametrize("device", DEVICES)
def test_nan_in_a_key_row_stays_in_that_column_of_distances(device):
    x, y, _ = make_inputs(1, 4, 6, 3, torch.float32, device)
    y = y.detach().clone()
    y[0, 3, 1] = float("nan")
    d = ops.pairwise_distance(x, y)
    assert torch.isnan(d[0, :, 3]).all()
    assert not torch.isnan(d[0, :, [0, 1, 2, 4, 5]]).any()


@pytest.mark.parametrize("device", DEVICES)
def test_half_precision_inputs_give_results_in_their_dtype(device):
    for dtype in (torch.float16, torch.bfloat16):
        x, y, scale = make_inputs(2, 9, 11, 8, dtype, device)
        target = torch.randint(0, 11, (2, 9), device=device)
        compare(
            lambda x, y, s: ops.similarity_cross_entropy(x, y, target, "sqeuclidean", s),
            lambda x, y, s: reference.similarity_cross_entropy(x, y, target, "sqeuclidean", s),
            (x, y, scale),
            dtype,
        )


@pytest.mark.parametrize("device", DEVICES)
def test_no_keys_give_zero_query_gradients(device):
    """N = 0: the backward kernels run on empty outputs and must still write
    every query gradient (to 0), in memory just freed full of NaN."""
    x = torch.randn(2, 3, 5, device=device, requires_grad=True)
    y = torch.randn(2, 0, 5, device=device, requires_grad=True)
    values = torch.randn(2, 0, 4, device=device)
    for name, fn in [
        ("pairwise_distance", lambda: ops.pairwise_distance(x, y, "euclidean")),
        ("similarity_log_softmax", lambda: ops.similarity_log_softmax(x, y, "cosine")),
        ("attention_readout", lambda: ops.attention_readout(x, y, values, "sqeuclidean")),
    ]:
        out = fn()
        torch.full_like(x, float("nan"))  # freed at once: NaN in memory the gradient may reuse
        grad_x, grad_y = torch.autograd.grad(out, (x, y), torch.randn_like(out))
        assert torch.equal(grad_x, torch.zeros_like(x)), name
        assert grad_y.shape == y.shape, name


@pytest.mark.parametrize("keys", [5, 600])
def test_cpu_query_gradient_reuses_the_buffer_just_freed(keys):
    """On the CPU the backward op's query gradient is written into the
    recycled buffer the previous one of its size freed, none of whose old
    values may remain (5 keys: the few-key loops; 600: two tiles and BLAS
    products)."""
    x, y, scale = make_inputs(3, 70, keys, 300, torch.float32, "cpu")
    target = torch.randint(0, keys, (3, 70))
    ops.release_recycled_buffers()

    def grad_x():
        loss = ops.similarity_cross_entropy(x, y, target, "sqeuclidean", scale, "none")
        return torch.autograd.grad(loss.sum(), x)[0]

    first = grad_x()
    freed = first.data_ptr()
    first.fill_(float("nan"))
    del first
    second = grad_x()
    assert second.data_ptr() == freed
    expected, eager = (
        torch.autograd.grad(
            reference.similarity_cross_entropy(
                ref_x, y.detach().to(ref_x.dtype), target, "sqeuclidean", scale.detach().to(ref_x.dtype), "none"
            ).sum(),
            ref_x,
        )[0]
        for ref_x in (x.detach().double().requires_grad_(), x.detach().clone().requires_grad_())
    )
    assert_close_to_reference(second, expected, eager)
