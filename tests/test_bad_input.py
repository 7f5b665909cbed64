"""Every argument check of the similarity ops raises an error naming the argument."""

import numpy as np
import pytest
import torch

from fastmeta import ops

x = torch.randn(2, 4, 3)
y = torch.randn(2, 5, 3)
target = torch.zeros(2, 4, dtype=torch.long)
values = torch.randn(2, 5, 6)

SIMILARITY_OPS = {
    "pairwise_distance": lambda x, y, **kw: ops.pairwise_distance(x, y, **kw),
    "similarity_log_softmax": lambda x, y, **kw: ops.similarity_log_softmax(x, y, **kw),
    "similarity_cross_entropy": lambda x, y, **kw: ops.similarity_cross_entropy(
        x, y, target if x.dim() == 3 else target[0], **kw
    ),
    "attention_readout": lambda x, y, **kw: ops.attention_readout(
        x, y, torch.randn(*y.shape[:-1], 6, dtype=y.dtype) if torch.is_tensor(y) else values, **kw
    ),
}


@pytest.mark.parametrize("name", SIMILARITY_OPS)
def test_shape_dtype_and_metric_errors(name):
    fn = SIMILARITY_OPS[name]
    with pytest.raises(ValueError, match=f"{name}: x and y must both be"):
        fn(x[0, 0], y)  # wrong rank
    with pytest.raises(ValueError, match=f"{name}: x and y must both be"):
        fn(x, y[0])  # ranks differ
    with pytest.raises(ValueError, match=r"feature sizes differ: x has D = 3 but y has D = 4"):
        fn(x, torch.randn(2, 5, 4))
    with pytest.raises(ValueError, match=r"x has B = 2 tasks but y has B = 3"):
        fn(x, torch.randn(3, 5, 3))
    with pytest.raises(ValueError, match="unknown metric 'manhattan'"):
        fn(x, y, metric="manhattan")
    with pytest.raises(TypeError, match="x must be a floating-point tensor, got dtype torch.int64"):
        fn(x.long(), y)
    with pytest.raises(TypeError, match="y has dtype torch.float64 but x has dtype torch.float32"):
        fn(x, y.double())
    with pytest.raises(TypeError, match="y must be a torch.Tensor"):
        fn(x, y.tolist())


def test_pairwise_distance_has_no_dot_metric():
    with pytest.raises(ValueError, match="unknown metric 'dot'"):
        ops.pairwise_distance(x, y, "dot")


@pytest.mark.parametrize("name", ["similarity_log_softmax", "similarity_cross_entropy", "attention_readout"])
def test_scale_errors(name):
    fn = SIMILARITY_OPS[name]
    with pytest.raises(ValueError, match=r"scale of shape \[3\] does not broadcast to \[B, Q\] = \[2, 4\]"):
        fn(x, y, scale=torch.ones(3))
    with pytest.raises(TypeError, match="scale must be a float or a tensor"):
        fn(x, y, scale="2")
    with pytest.raises(TypeError, match="scale must be a floating-point tensor"):
        fn(x, y, scale=torch.ones(2, 4, dtype=torch.long))


def test_cross_entropy_target_and_reduction_errors():
    with pytest.raises(ValueError, match="unknown reduction 'avg'"):
        ops.similarity_cross_entropy(x, y, target, reduction="avg")
    with pytest.raises(TypeError, match="target must have dtype torch.int64, got torch.float32"):
        ops.similarity_cross_entropy(x, y, target.float())
    with pytest.raises(TypeError, match="target must have dtype torch.int64, got torch.int32"):
        ops.similarity_cross_entropy(x, y, target.int())
    with pytest.raises(ValueError, match=r"target must have shape \[2, 4\] \(one class per query\), got \[2, 3\]"):
        ops.similarity_cross_entropy(x, y, target[:, :3])
    with pytest.raises(TypeError, match="target must be a torch.Tensor"):
        ops.similarity_cross_entropy(x, y, [0, 1])
    for bad in (5, -1):
        t = target.clone()
        t[1, 2] = bad
        with pytest.raises(RuntimeError, match=rf"target\[1, 2\] = {bad} is out of range for 5 classes"):
            ops.similarity_cross_entropy(x, y, t)


def test_attention_values_errors():
    with pytest.raises(ValueError, match=r"values must have shape \[2, 5\] \+ \[V\]"):
        ops.attention_readout(x, y, values[:, :4])
    with pytest.raises(TypeError, match="values has dtype torch.float64"):
        ops.attention_readout(x, y, values.double())


def test_raw_ops_check_their_arguments_too():
    # Calling torch.ops.fastmeta directly gets the kernels' own checks, not a crash.
    scale = torch.ones(2, 4)
    with pytest.raises(RuntimeError, match="unknown metric 'l1'"):
        torch.ops.fastmeta.similarity_cross_entropy(x, y, target, scale, "l1")
    with pytest.raises(RuntimeError, match=r"y has size 4 in dimension 2 but the feature size D of x is 3"):
        torch.ops.fastmeta.similarity_log_softmax(x, torch.randn(2, 5, 4), scale, "dot")
    with pytest.raises(RuntimeError, match=r"scale must have 2 dimensions"):
        torch.ops.fastmeta.attention_readout(x, y, values, torch.ones(2), "dot")
    with pytest.raises(RuntimeError, match=r"target must have shape \[B, Q\]"):
        torch.ops.fastmeta.similarity_cross_entropy(x, y, target[0], scale, "dot")
    with pytest.raises(RuntimeError, match=r"target must have shape \[B, Q\]"):
        torch.ops.fastmeta.similarity_cross_entropy_with_grad(x, y, target[0], scale, "dot", 1.0)
    bad_target = target.clone()
    bad_target[0, 3] = 9
    with pytest.raises(RuntimeError, match=r"target\[0, 3\] = 9 is out of range for 5 classes"):
        torch.ops.fastmeta.similarity_cross_entropy_with_grad(x, y, bad_target, scale, "dot", 1.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device")
def test_tensors_on_different_devices():
    with pytest.raises(ValueError, match="y is on cuda:0 but x is on cpu"):
        ops.similarity_cross_entropy(x, y.cuda(), target)
    with pytest.raises(ValueError, match="target is on cpu but x is on cuda:0"):
        ops.similarity_cross_entropy(x.cuda(), y.cuda(), target)


def test_tensors_on_different_devices_with_the_meta_device():
    # The check runs before any kernel, so the meta device exercises it on a CPU-only machine.
    with pytest.raises(ValueError, match="y is on meta but x is on cpu"):
        ops.similarity_log_softmax(x, y.to("meta"))
    with pytest.raises(ValueError, match="values is on meta but x is on cpu"):
        ops.attention_readout(x, y, values.to("meta"))
    with pytest.raises(ValueError, match="scale is on meta but x is on cpu"):
        ops.similarity_log_softmax(x, y, scale=torch.tensor(2.0, device="meta"))


def test_numpy_scalars_are_accepted_where_python_numbers_are():
    for name in ("similarity_log_softmax", "similarity_cross_entropy", "attention_readout"):
        fn = SIMILARITY_OPS[name]
        results = []
        for scale in (np.float32(0.5), 0.5):
            torch.manual_seed(0)  # the same values for attention_readout
            results.append(fn(x, y, scale=scale))
        torch.testing.assert_close(*results)
    support, labels = torch.randn(6, 3), torch.arange(6) % 3
    torch.testing.assert_close(
        ops.class_prototypes(support, labels, np.int64(3)), ops.class_prototypes(support, labels, 3)
    )
    torch.testing.assert_close(
        ops.contrastive_loss(x, y[:, :4], torch.ones(2, 4), np.float32(2.0)),
        ops.contrastive_loss(x, y[:, :4], torch.ones(2, 4), 2.0),
    )
    weights = [torch.randn(12, 6), torch.randn(12, 3), torch.randn(12)]
    torch.testing.assert_close(
        ops.matching_attention_lstm(x, y, *weights, steps=np.int64(2)),
        ops.matching_attention_lstm(x, y, *weights, steps=2),
    )
    memory = [
        torch.randn(2, 5, 3),
        torch.rand(2, 5),
        torch.softmax(torch.randn(2, 1, 5), -1),
        torch.randn(2, 3, 1, 3),
        torch.rand(2, 3, 1),
    ]
    torch.testing.assert_close(ops.mann_memory(*memory, np.float32(2.0)).reads, ops.mann_memory(*memory, 2.0).reads)


def test_non_contiguous_inputs_are_handled():
    xt = torch.randn(2, 3, 4).transpose(1, 2)  # [2, 4, 3], not contiguous
    yt = torch.randn(2, 3, 5).transpose(1, 2)
    assert not xt.is_contiguous()
    torch.testing.assert_close(
        ops.similarity_cross_entropy(xt, yt, target),
        ops.similarity_cross_entropy(xt.contiguous(), yt.contiguous(), target),
    )
