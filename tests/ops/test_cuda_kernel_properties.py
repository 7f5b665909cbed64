"""Properties the CUDA kernels once lacked (found by reading them and by
running them under emulation, before any GPU run): NaN and infinity
propagation, exact zero self-distances, determinism, shared-memory plans that
fit every GPU, device-side assertions. Each runs on CUDA when a GPU is
present, and on the CPU where the property holds there too."""

import pytest
import torch

import fastmeta
from fastmeta import ops, reference
from fastmeta.testing import DEVICES, randn, run_until_device_assertion

METRICS = ["sqeuclidean", "euclidean", "cosine", "dot"]
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


def metric_outputs(x, y, metric, target, values, scale):
    """Every similarity op's output on (x, y), reduced to one loss per op."""
    outputs = {
        "similarity_log_softmax": ops.similarity_log_softmax(x, y, metric, scale),
        "similarity_cross_entropy": ops.similarity_cross_entropy(x, y, target, metric, scale, "none"),
        "attention_readout": ops.attention_readout(x, y, values, metric, scale),
    }
    if metric != "dot":
        outputs["pairwise_distance"] = ops.pairwise_distance(x, y, metric)
    return outputs


def inputs(device, dtype=torch.float64, poison=None):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 40, generator=g, dtype=dtype)
    y = torch.randn(2, 7, 40, generator=g, dtype=dtype)
    if poison == "nan row":
        x[1, 2] = float("nan")
    elif poison == "inf entry":
        x[1, 2, 3] = float("inf")
        y[0, 4, 0] = float("-inf")
    target = torch.randint(0, 7, (2, 5), generator=g)
    values = torch.randn(2, 7, 3, generator=g, dtype=dtype)
    scale = 0.5 + torch.rand(2, 5, generator=g, dtype=dtype)
    return [t.to(device) for t in (x, y, target, values, scale)]


# Finding 1: a row whose logits are all NaN gave 0 instead of NaN on CUDA.
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("metric", METRICS)
def test_a_nan_row_gives_nan_in_that_row_of_every_op(device, metric):
    x, y, target, values, scale = inputs(device, poison="nan row")
    for name, out in metric_outputs(x, y, metric, target, values, scale).items():
        rows = out.reshape(2, 5, -1)
        assert torch.isnan(rows[1, 2]).all(), name
        keep = torch.ones(2, 5, dtype=torch.bool, device=device)
        keep[1, 2] = False
        assert not torch.isnan(rows[keep]).any(), name


# Found under CUDA emulation: a row whose logits are all -inf (an infinite
# query at infinite distance from every key) gave attention_readout 0 and an
# lse of -inf on CUDA; it has no softmax, so NaN, as in PyTorch.
@pytest.mark.parametrize("device", DEVICES)
def test_a_row_of_logits_all_minus_infinity_gives_nan(device):
    x = torch.tensor([[[float("inf"), 1.0], [0.5, 1.0]]], dtype=torch.float64, device=device)
    y = -0.1 - torch.rand(1, 3, 2, dtype=torch.float64, device=device)  # x . y = -inf for the first query
    values = torch.randn(1, 3, 4, dtype=torch.float64, device=device)
    scale = torch.ones(1, 2, dtype=torch.float64, device=device)
    target = torch.tensor([[1, 2]], device=device)
    outputs = [
        ops.attention_readout(x, y, values, "sqeuclidean", scale),
        ops.similarity_log_softmax(x, y, "sqeuclidean", scale),
        ops.similarity_cross_entropy(x, y, target, "sqeuclidean", scale, "none"),
    ]
    for out in outputs:
        rows = out.reshape(2, -1)
        assert rows[0].isnan().all() and rows[1].isfinite().all()


# Finding 5: an infinite input gave NaN gradients on CUDA where the CPU stays finite.
@needs_gpu
@pytest.mark.parametrize("metric", METRICS)
def test_infinite_inputs_give_the_cpus_values_and_gradients(metric):
    results = {}
    for device in ("cpu", "cuda"):
        x, y, target, values, scale = inputs(device, poison="inf entry")
        x.requires_grad_(), y.requires_grad_()
        outs = metric_outputs(x, y, metric, target, values, scale)
        results[device] = {
            name: [out.detach()] + list(torch.autograd.grad(torch.nan_to_num(out).sum(), (x, y), allow_unused=True))
            for name, out in outs.items()
        }
    for name, on_cpu in results["cpu"].items():
        for a, b in zip(results["cuda"][name], on_cpu):
            if a is None or b is None:
                continue
            torch.testing.assert_close(a.cpu(), b, equal_nan=True, rtol=1e-9, atol=1e-9, msg=name)


# Finding 2: the distance of a row to itself was not 0 on CUDA (row norms and
# dot products summed in different orders). The CPU's BLAS products give no
# such guarantee (neither does torch.cdist's matrix-product path).
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("metric", ["sqeuclidean", "euclidean"])
def test_distance_of_a_row_to_itself_is_exactly_zero_on_cuda(dtype, metric):
    x = randn(256, 64, dtype=dtype, device="cuda", requires_grad=True)
    d = ops.pairwise_distance(x, x.detach(), metric)
    assert torch.all(d.diagonal() == 0)
    if metric == "euclidean":
        (grad,) = torch.autograd.grad(d.diagonal().sum(), x)
        assert torch.all(grad == 0)


# Every backward is deterministic: no atomics, fixed reduction orders.
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("metric", METRICS)
def test_backward_twice_gives_identical_gradients(device, metric):
    def gradients():
        x, y, target, values, scale = inputs(device, dtype=torch.float32)
        leaves = [t.requires_grad_() for t in (x, y, values, scale)]
        outs = metric_outputs(x, y, metric, target, values, scale)
        loss = sum(out.sum() for out in outs.values())
        support = torch.randn(3, 9, 40, device=device, requires_grad=True)
        loss = loss + ops.class_prototypes(support, torch.arange(9, device=device).repeat(3, 1) % 3, 3).sum()
        lstm = fastmeta.nn.CoordinatewiseLSTM().to(device)
        update, state = lstm(1e-3 * torch.randn(300, device=device))
        loss = loss + update.sum() + state.sum()
        return torch.autograd.grad(loss, leaves + [support] + list(lstm.parameters()))

    torch.manual_seed(0)
    first = gradients()
    torch.manual_seed(0)
    for a, b in zip(first, gradients()):
        assert torch.equal(a, b)


# Finding 3: the L2O backward reserved more shared memory than it uses, so the
# default LSTM did not fit sm_86/sm_89; now one formula sizes it and the
# weights or their gradients move to global memory where a device is small.
LIMITS = {"sm_86/sm_89": 101376, "sm_80": 166912, "sm_90": 232448}


def test_lstm_shared_memory_plan_fits_the_default_lstm_on_every_gpu():
    plan = fastmeta._C.l2o_shared_plan
    for name, limit in LIMITS.items():
        for backward in (False, True):
            weights_shared, grads_shared, bytes_ = plan(2, 20, backward, 4, limit)
            assert (weights_shared, grads_shared) == (True, backward) and 0 < bytes_ <= limit, name
    # The default backward in float32 needs exactly 97,704 bytes: weights and
    # their gradients (2 x 5141) and 64 coordinates of 2K + 7H + 1 = 221 values.
    assert plan(2, 20, True, 4, LIMITS["sm_90"]) == (True, True, 4 * (2 * 5141 + 64 * 221))
    # float64: everything in shared memory on sm_90, the gradients in global
    # memory on sm_80; on sm_86/sm_89 even the columns alone do not fit.
    assert plan(2, 20, True, 8, LIMITS["sm_90"])[:2] == (True, True)
    assert plan(2, 20, True, 8, LIMITS["sm_80"])[:2] == (True, False)
    assert plan(2, 20, True, 8, LIMITS["sm_86/sm_89"])[2] == -1
    # Past what fits, the weights go to global memory before the kernel refuses.
    assert plan(2, 32, True, 4, LIMITS["sm_86/sm_89"])[:2] == (False, False)


def largest_hidden_size(element_bytes, limit):
    hidden = 1
    while fastmeta._C.l2o_shared_plan(2, hidden + 1, True, element_bytes, limit)[2] > 0:
        hidden += 1
    return hidden


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("hidden", ["default", "largest"])
def test_l2o_step_at_the_default_and_the_largest_hidden_size_matches_the_reference(dtype, hidden):
    limit = torch.cuda.get_device_properties(0).shared_memory_per_block_optin
    H = 20 if hidden == "default" else largest_hidden_size(torch.finfo(dtype).bits // 8, limit)
    lstm = fastmeta.nn.CoordinatewiseLSTM(hidden_size=H).to("cuda", dtype)
    grad = 1e-3 * torch.randn(130, device="cuda", dtype=dtype)
    state = 0.1 * torch.randn(2, 2, H, 130, device="cuda", dtype=dtype)
    weights = lstm.flat_weights().detach()
    tensors = [t.clone().requires_grad_() for t in (grad, state, weights)]
    ref_tensors = [t.detach().double().requires_grad_() for t in tensors]
    got = ops.l2o_lstm_step(*tensors)
    want = reference.l2o_lstm_step(*ref_tensors)
    got_grads = torch.autograd.grad(got[0].sum() + got[1].sum(), tensors)
    want_grads = torch.autograd.grad(want[0].sum() + want[1].sum(), ref_tensors)
    tol = 1e-9 if dtype == torch.float64 else 2e-4
    for a, b in zip(list(got) + list(got_grads), list(want) + list(want_grads)):
        torch.testing.assert_close(a.double(), b, rtol=tol, atol=tol * max(1.0, b.abs().max().item()))


# Finding 5: padding lanes (P not a multiple of 64) computed 0 * e^p = NaN for
# a large preprocess_p and poisoned the weight gradients.
@pytest.mark.parametrize("device", DEVICES)
def test_large_preprocess_p_keeps_the_weight_gradients_finite(device):
    lstm = fastmeta.nn.CoordinatewiseLSTM(hidden_size=5, preprocess_p=100.0).to(device)
    update, state = lstm(torch.randn(70, device=device))
    (weight_grads) = torch.autograd.grad(update.sum() + state.sum(), list(lstm.parameters()))
    assert all(torch.isfinite(g).all() for g in weight_grads)


# Finding 4: the CUDA class_prototypes backward read out of bounds for labels
# out of range; they are now device-side assertions.
@needs_gpu
def test_class_prototypes_backward_with_labels_out_of_range_is_a_device_assertion():
    output = run_until_device_assertion(
        "import torch, fastmeta; torch.ops.fastmeta.class_prototypes_backward("
        "torch.randn(1, 3, 2, device='cuda'), torch.tensor([[0, 5, 1]], device='cuda')); "
        "torch.cuda.synchronize()"
    )
    assert "a label is out of range" in output
