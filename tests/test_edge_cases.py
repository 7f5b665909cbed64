"""Inputs that used to crash fastmeta, corrupt a result silently or give an
unclear message: each now gives the right result or a clear error."""

import os

import pytest
import torch
from torch import nn

import fastmeta
from fastmeta import ops, reference
from fastmeta.algorithms import MAML, BatchedMAML, MetaSGD, Reptile
from fastmeta.data import sinusoid_tasks

# --- in-place ops and autograd versions -----------------------------------------------------------


def lstm_and_weights():
    lstm = fastmeta.nn.CoordinatewiseLSTM(hidden_size=4)
    return lstm, lstm.flat_weights().detach()


@pytest.mark.parametrize("optimizer", ["sgd", "learned"])
def test_a_step_after_the_forward_makes_the_backward_raise_as_torch_optim_does(optimizer):
    lstm, _ = lstm_and_weights()
    w = torch.randn(5, requires_grad=True)
    loss = (w * w).sum()  # saves w for its backward
    w.grad = torch.randn(5)
    opt = torch.optim.SGD([w], lr=0.1) if optimizer == "sgd" else fastmeta.optim.LearnedOptimizer([w], lstm)
    opt.step()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_in_place_step_bumps_the_versions_of_what_it_writes():
    lstm, weights = lstm_and_weights()
    param, grad, state = torch.randn(6), torch.randn(6), lstm.initial_state(torch.zeros(6))
    before = (param._version, state._version, grad._version, weights._version)
    ops.l2o_lstm_step_(param, grad, state, weights)
    after = (param._version, state._version, grad._version, weights._version)
    assert after[0] > before[0] and after[1] > before[1]
    assert after[2:] == before[2:]


def test_in_place_step_rejects_aliased_arguments():
    lstm, weights = lstm_and_weights()
    param, state = torch.randn(6), lstm.initial_state(torch.zeros(6))
    op = torch.ops.fastmeta.l2o_lstm_step_
    with pytest.raises(RuntimeError, match="param is written in place and must not share memory with grad"):
        op(param, param, state, weights, 10.0, 0.1)
    flat = torch.randn(6 + state.numel())
    with pytest.raises(RuntimeError, match="param is written in place and must not share memory with state"):
        op(flat[:6], torch.randn(6), flat[4 : 4 + state.numel()].view(state.shape), weights, 10.0, 0.1)
    with pytest.raises(RuntimeError, match="state is written in place and must not share memory with weights"):
        big = torch.randn(state.numel() + weights.numel())
        op(param, torch.randn(6), big[: state.numel()].view(state.shape), big[1 : 1 + weights.numel()], 10.0, 0.1)


# --- BatchedMAML takes the fused path only where it is exact ----------------------------------------


class ScaledLinear(nn.Linear):
    def forward(self, x):
        return 1.5 * super().forward(x)


def learners():
    torch.manual_seed(0)

    def mlp(first):
        return nn.Sequential(first, nn.Tanh(), nn.Linear(6, 1)).double()

    hooked = mlp(nn.Linear(1, 6))
    hooked[0].register_forward_hook(lambda module, inputs, out: out * 0.5)
    pre_hooked = mlp(nn.Linear(1, 6))
    pre_hooked[2].register_forward_pre_hook(lambda module, inputs: (inputs[0] + 0.25,))
    # In eval mode: in train mode each forward runs a power iteration that
    # updates the layer's buffers, so no two ways of calling it agree.
    spectral = mlp(nn.utils.parametrizations.spectral_norm(nn.Linear(1, 6))).eval()
    tied = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 3)).double()
    tied[2].weight = tied[0].weight
    return {
        "subclass": mlp(ScaledLinear(1, 6)),
        "forward hook": hooked,
        "forward pre-hook": pre_hooked,
        "spectral norm": spectral,
        "tied weights": tied,
    }


@pytest.mark.parametrize("kind", list(learners()))
def test_batched_maml_is_exact_for_modules_the_fused_kernels_do_not_reproduce(kind):
    net = learners()[kind]
    features = net[0].in_features
    g = torch.Generator().manual_seed(1)
    x_s, x_q = (torch.randn(3, 5, features, generator=g, dtype=torch.float64) for _ in range(2))
    y_s, y_q = (torch.randn(3, 5, net[2].out_features, generator=g, dtype=torch.float64) for _ in range(2))
    bm = BatchedMAML(net, inner_lr=0.1, inner_steps=2)
    assert not bm.fused
    params = [p for p in net.parameters()]
    got = torch.autograd.grad(bm(x_s, y_s, x_q, y_q), params)
    loss_fn = lambda out, y: ((out - y) ** 2).mean()  # noqa: E731
    want = torch.autograd.grad(
        reference.maml_query_losses_loop(net, loss_fn, 0.1, 2, x_s, y_s, x_q, y_q).mean(), params
    )
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_fused_path_follows_hooks_added_after_construction():
    net = nn.Sequential(nn.Linear(1, 4), nn.ReLU(), nn.Linear(4, 1))
    bm = BatchedMAML(net, inner_lr=0.1)
    assert bm.fused
    handle = net[2].register_forward_hook(lambda module, inputs, out: out + 1)
    assert not bm.fused
    handle.remove()
    assert bm.fused


@pytest.mark.parametrize("fused", [True, False])
def test_batched_maml_rejects_zero_tasks_empty_queries_and_negative_steps(fused):
    net = nn.Sequential(nn.Linear(1, 4), nn.ReLU(), nn.Linear(4, 1))
    bm = BatchedMAML(net, 0.1, loss="mse" if fused else (lambda out, y: ((out - y) ** 2).mean()))
    assert bm.fused == fused
    x_s, y_s, x_q, y_q = sinusoid_tasks(3, 4, num_query=4)
    with pytest.raises(ValueError, match=r"there are no tasks \(T = 0\)"):
        bm(x_s[:0], y_s[:0], x_q[:0], y_q[:0])
    with pytest.raises(ValueError, match="the query set is empty"):
        bm(x_s, y_s, x_q[:, :0], y_q[:, :0])
    with pytest.raises(ValueError, match="inner steps must be an int >= 0, got -1"):
        bm.adapt(x_s, y_s, steps=-1)
    with pytest.raises(ValueError, match="inner steps must be an int >= 0, got -2"):
        BatchedMAML(net, 0.1, inner_steps=-2)


def test_batched_maml_names_both_devices_of_a_meta_operand():
    bm = BatchedMAML(nn.Sequential(nn.Linear(1, 4), nn.ReLU(), nn.Linear(4, 1)), 0.1)
    x_s, y_s, x_q, y_q = sinusoid_tasks(3, 4, num_query=4)
    with pytest.raises(ValueError, match="y_query is on meta but the module's parameters are on cpu"):
        bm(x_s, y_s, x_q, y_q.to("meta"))


def test_raw_ops_with_one_meta_operand_are_errors_not_uninitialised_results():
    params, x, y = torch.randn(2, 9), torch.randn(2, 3, 2), torch.randn(2, 3, 1)
    with pytest.raises(RuntimeError, match="target must be on cpu like params, got meta"):
        torch.ops.fastmeta.mlp_task_derivatives(
            params, x, y.to("meta"), None, [2, 2, 1], ["relu", "identity"], "mse", False
        )
    with pytest.raises(RuntimeError, match="y must be on meta like x, got cpu"):
        torch.ops.fastmeta.pairwise_distance(torch.randn(1, 2, 3, device="meta"), torch.randn(1, 2, 3), "sqeuclidean")


def test_reptile_with_zero_tasks_is_an_error_and_leaves_the_parameters():
    net = nn.Sequential(nn.Linear(1, 4), nn.ReLU(), nn.Linear(4, 1))
    before = [p.detach().clone() for p in net.parameters()]
    x, y = sinusoid_tasks(0, 5)
    with pytest.raises(ValueError, match=r"Reptile: there are no tasks \(T = 0\)"):
        Reptile(net, inner_lr=0.02).step(x, y)
    for p, q in zip(net.parameters(), before):
        assert torch.equal(p, q)


# --- sizes ---------------------------------------------------------------------------------------


def test_huge_mlp_widths_are_an_error_not_an_overflow():
    params, x, y = torch.randn(1, 9), torch.randn(1, 3, 2), torch.randn(1, 3, 1)
    for widths in ([2, 2**40, 2**40, 1], [2, 2**62, 1], [2**61, 4, 1], [2, 2**31, 2**31, 2**31, 1]):
        with pytest.raises(RuntimeError, match="on N = 3 points per task is too large"):
            torch.ops.fastmeta.mlp_task_derivatives(
                params, x, y, None, widths, ["relu"] * (len(widths) - 1), "mse", False
            )


def test_an_mlp_workspace_beyond_memory_is_a_clear_error():
    hidden, N = 2**24, 2**20  # valid sizes, but 6 N (hidden + 1) activations are 400 TB
    params = torch.zeros(1, 3 * hidden + 1)
    x, y = torch.zeros(1, N, 1), torch.zeros(1, N, 1)
    with pytest.raises(RuntimeError, match="not enough memory for the workspace of a task"):
        torch.ops.fastmeta.mlp_task_derivatives(params, x, y, None, [1, hidden, 1], ["relu", "identity"], "mse", False)


def test_more_classes_than_support_examples_is_an_error_not_an_allocation():
    support = torch.randn(2, 4, 3, dtype=torch.float64)
    labels = torch.arange(4).repeat(2, 1)
    for num_classes in (5, 2**60):
        with pytest.raises(RuntimeError, match=f"num_classes = {num_classes} but each task has only S = 4"):
            torch.ops.fastmeta.class_prototypes(support, labels, num_classes)


def _available_memory_gib() -> float:
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) / 2**20
    except (OSError, KeyError, ValueError):
        return 0.0


@pytest.mark.skipif(_available_memory_gib() < 14, reason="needs 8 GiB for a feature vector of 2^31 floats")
def test_feature_size_beyond_32_bits_is_not_truncated_in_the_matrix_products():
    D = 2**31 + 8  # the BLAS's 32-bit sizes would truncate this
    x = torch.zeros(1, 1, D)
    x[..., -8:] = 1  # only the entries past 2^31 are not zero
    distance = torch.ops.fastmeta.pairwise_distance(x, x, "sqeuclidean")
    assert distance.item() == 0.0
    similarity = torch.ops.fastmeta.similarity_log_softmax(x, x, torch.ones(1, 1), "dot")
    assert similarity.item() == 0.0  # log-softmax over one key


# --- clear messages ------------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", [MAML, MetaSGD])
def test_maml_on_a_module_without_parameters(algorithm):
    learner = algorithm(nn.ReLU(), 0.1).clone()
    loss = learner(torch.randn(3, requires_grad=True)).sum()
    with pytest.raises(ValueError, match=f"{algorithm.__name__}.adapt: the module has no parameters to adapt"):
        learner.adapt(loss)


@pytest.mark.parametrize("algorithm", [BatchedMAML, Reptile])
def test_batched_algorithms_on_a_module_without_parameters(algorithm):
    with pytest.raises(ValueError, match=f"{algorithm.__name__}: the module has no parameters to adapt"):
        algorithm(nn.ReLU(), 0.1)


def test_batched_hvp_of_a_module_without_parameters():
    x = torch.randn(2, 3, 1)
    with pytest.raises(ValueError, match="batched_hvp: the module has no parameters"):
        fastmeta.functional.batched_hvp(nn.ReLU(), {}, {}, x, x)


def test_state_of_another_lstm_is_blamed_on_the_state():
    small, large = fastmeta.nn.CoordinatewiseLSTM(hidden_size=4), fastmeta.nn.CoordinatewiseLSTM(hidden_size=6)
    grad = torch.randn(10)
    _, state = small(grad)
    with pytest.raises(
        ValueError,
        match=r"state has shape \[2, 2, 4, 10\], the state of an LSTM with "
        r"num_layers = 2 and hidden_size = 4, but this one has "
        r"num_layers = 2 and hidden_size = 6",
    ):
        large(grad, state)
    with pytest.raises(ValueError, match="are the state and the weights from the same LSTM"):
        ops.l2o_lstm_step(grad, state, large.flat_weights().detach())
    with pytest.raises(
        RuntimeError,
        match=r"a state of shape \[2, 2, 4, 10\] .* needs 261 weights, "
        r"but weights has 535; are the state and the weights",
    ):
        torch.ops.fastmeta.l2o_lstm_step(grad, state, large.flat_weights().detach(), 10.0, 0.1)


def test_learned_optimizer_names_the_parameter_dtype():
    lstm = fastmeta.nn.CoordinatewiseLSTM(hidden_size=4)
    w = torch.zeros(3, dtype=torch.float16, requires_grad=True)
    w.grad = torch.ones_like(w)
    with pytest.raises(TypeError, match="LearnedOptimizer: a parameter has dtype torch.float16"):
        fastmeta.optim.LearnedOptimizer([w], lstm).step()


def test_fakes_name_what_is_wrong():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x, y = torch.randn(2, 3, 4), torch.randn(2, 5, 4)
        with pytest.raises(RuntimeError, match=r"grad has N = 4 in dimension 2 but y has N = 5"):
            torch.ops.fastmeta.pairwise_distance_backward(
                torch.randn(2, 3, 4), torch.randn(2, 3, 5), x, y, "sqeuclidean"
            )
        with pytest.raises(RuntimeError, match="unknown metric 'l2'"):
            torch.ops.fastmeta.pairwise_distance(x, y, "l2")


def test_bench_json_into_a_missing_folder_fails_before_running(tmp_path, capsys):
    from fastmeta.__main__ import main

    target = tmp_path / "missing" / "out.json"
    with pytest.raises(SystemExit):
        main(["bench", "--case", "proto_episode", "--json", str(target)])
    assert f"the folder {os.path.dirname(target)} does not exist" in capsys.readouterr().err
