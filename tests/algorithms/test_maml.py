"""Batched second-order MAML: the fused MLP derivatives op against torch.func,
the meta-gradient engine against PyTorch's double backward, the algorithms
(learn2learn-style MAML / MetaSGD, BatchedMAML, Reptile) and bad input."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastmeta
from fastmeta import functional, ops, reference
from fastmeta.algorithms import (
    ANIL,
    MAML,
    BatchedMAML,
    MetaSGD,
    Reptile,
    batched_maml,
    clone_module,
    iMAML,
    maml_update,
    meta_sgd_update,
)
from fastmeta.data import sinusoid_tasks
from fastmeta.testing import DEVICES, FLOAT_DTYPES, assert_close_to_reference

DOUBLE = dict(dtype=torch.float64)

# (widths, activations, loss): odd widths, widths around the 16-wide CPU
# blocks, width 1, one layer and eight.
MLPS = [
    ([1, 40, 40, 1], ["relu", "relu", "identity"], "mse"),
    ([3, 17, 16, 5], ["tanh", "sigmoid", "identity"], "cross_entropy"),
    ([2, 33, 4], ["elu", "tanh"], "mse"),
    ([7, 1, 3], ["sigmoid", "elu"], "cross_entropy"),
    ([5, 2], ["identity"], "mse"),
    ([4] + [6] * 7 + [3], ["tanh", "relu", "elu", "sigmoid"] * 2, "cross_entropy"),
]
TASKS = [(5, 10), (1, 1), (0, 3), (3, 33)]  # (T, N)


def num_params(widths):
    return sum(o * (i + 1) for i, o in zip(widths[:-1], widths[1:]))


def mlp_operands(widths, loss, T, N, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    P = num_params(widths)

    def randn(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g, dtype=torch.float64)).to(device, dtype)

    params = randn(T, P, scale=0.7)
    x = randn(T, N, widths[0])
    target = randn(T, N, widths[-1]) if loss == "mse" else torch.randint(0, widths[-1], (T, N), generator=g).to(device)
    return params, x, target, randn(T, P)


def mlp_module(widths, activations, dtype=torch.float64):
    layers = []
    classes = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "elu": nn.ELU}
    for n_in, n_out, f in zip(widths[:-1], widths[1:], activations):
        layers.append(nn.Linear(n_in, n_out))
        if f != "identity":
            layers.append(classes[f]())
    return nn.Sequential(*layers).to(dtype)


# --- the fused op -------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("widths,activations,loss", MLPS)
@pytest.mark.parametrize("T,N", TASKS)
def test_mlp_derivatives_match_torch_func(widths, activations, loss, T, N, dtype, device):
    params, x, target, direction = mlp_operands(widths, loss, T, N, dtype, device)
    for d, input_grad in ((None, False), (direction, True), (direction, False), (None, True)):
        got = fastmeta.ops.mlp_task_derivatives(
            params, x, target, d, widths=widths, activations=activations, loss=loss, input_grad=input_grad
        )
        want, eager = (
            reference.mlp_task_derivatives(
                params.to(to),
                x.to(to),
                target.to(to) if loss == "mse" else target,
                None if d is None else d.to(to),
                widths,
                activations,
                loss,
                input_grad,
            )
            for to in (torch.float64, dtype)
        )
        for name, a, b, c in zip(("loss", "grad", "grad_input", "hvp", "hvp_input"), got, want, eager):
            assert a.shape == b.shape, name
            assert_close_to_reference(a, b, c, msg=f"{name} differs")


def test_mlp_derivatives_hvp_equals_the_autograd_hessian():
    widths, activations = [3, 5, 2], ["sigmoid", "identity"]
    params, x, target, direction = mlp_operands(widths, "mse", 2, 4, torch.float64, "cpu")
    hvp = fastmeta.ops.mlp_task_derivatives(params, x, target, direction, widths=widths, activations=activations)[3]
    for t in range(2):
        hessian = torch.autograd.functional.hessian(
            lambda p: F.mse_loss(reference.mlp_forward(p, x[t], widths, activations), target[t]), params[t]
        )
        torch.testing.assert_close(hvp[t], hessian @ direction[t], rtol=1e-10, atol=1e-12)


def test_mlp_derivatives_kinks_follow_pytorch():
    """relu'(0) = 0 and elu'(0) = 1, as PyTorch's autograd."""
    widths = [1, 1]
    params = torch.tensor([[1.0, 0.0]], dtype=torch.float64)  # z = x
    x = torch.zeros(1, 1, 1, dtype=torch.float64)
    target = torch.ones(1, 1, 1, dtype=torch.float64)
    for f in ("relu", "elu"):
        got = fastmeta.ops.mlp_task_derivatives(
            params, x, target, torch.ones_like(params), widths=widths, activations=[f], input_grad=True
        )
        want = reference.mlp_task_derivatives(params, x, target, torch.ones_like(params), widths, [f], "mse", True)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b)


def test_mlp_derivatives_opcheck():
    for widths, activations, loss in MLPS[:3]:
        params, x, target, direction = mlp_operands(widths, loss, 3, 5, torch.float64, "cpu")
        for d in (None, direction):
            torch.library.opcheck(
                torch.ops.fastmeta.mlp_task_derivatives, (params, x, target, d, widths, activations, loss, True)
            )


def test_mlp_derivatives_non_contiguous_inputs():
    widths, activations = [3, 8, 2], ["tanh", "identity"]
    params, x, target, direction = mlp_operands(widths, "mse", 4, 6, torch.float64, "cpu")
    x_strided = x.transpose(1, 2).contiguous().transpose(1, 2)
    params_strided = params.t().contiguous().t()
    got = fastmeta.ops.mlp_task_derivatives(
        params_strided, x_strided, target, direction, widths=widths, activations=activations
    )
    want = fastmeta.ops.mlp_task_derivatives(params, x, target, direction, widths=widths, activations=activations)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_mlp_derivatives_take_expanded_parameters_without_a_copy():
    """The engine passes the initial parameters expanded over tasks (row stride 0)."""
    widths, activations = [3, 8, 2], ["elu", "identity"]
    params, x, target, direction = mlp_operands(widths, "mse", 4, 6, torch.float64, "cpu")
    expanded = params[0].expand(4, -1)
    got = fastmeta.ops.mlp_task_derivatives(
        expanded, x, target, direction, widths=widths, activations=activations, input_grad=True
    )
    want = fastmeta.ops.mlp_task_derivatives(
        expanded.contiguous(), x, target, direction, widths=widths, activations=activations, input_grad=True
    )
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_mlp_derivatives_nan_stays_in_its_task():
    widths, activations = [2, 4, 1], ["relu", "identity"]
    params, x, target, direction = mlp_operands(widths, "mse", 3, 5, torch.float64, "cpu")
    x[1, 2, 0] = float("nan")
    loss, grad, _, hvp, _ = fastmeta.ops.mlp_task_derivatives(
        params, x, target, direction, widths=widths, activations=activations
    )
    assert loss[1].isnan() and loss[[0, 2]].isfinite().all()
    assert grad[[0, 2]].isfinite().all() and hvp[[0, 2]].isfinite().all()


# --- the meta-gradient engine -------------------------------------------------------------------


def double_backward_meta_gradient(net, loss, lr, steps, tasks, weights, wrt):
    """The meta-gradient by PyTorch's double backward, task by task."""
    criterion = functional.loss_function(loss)
    theta, lr_t = wrt[0], wrt[1]
    x_s, y_s, x_q, y_q = tasks
    losses = []
    for t in range(x_s.shape[0]):
        p = theta
        for _ in range(steps):
            out = torch.func.functional_call(net, functional.flat_to_dict(net, p), (x_s[t],))
            (g,) = torch.autograd.grad(criterion(out, y_s[t]), p, create_graph=True)
            p = p - lr_t * g
        out = torch.func.functional_call(net, functional.flat_to_dict(net, p), (x_q[t],))
        losses.append(criterion(out, y_q[t]))
    losses = torch.stack(losses)
    return losses, torch.autograd.grad((losses * weights).sum(), wrt, allow_unused=True)


def relative_error(a, b):
    if b is None:
        return 0.0 if a is None or not a.any() else float("inf")
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def engine_query_losses(path, net, loss):
    """``query_losses(theta, lr, x_s, y_s, x_q, y_q, steps, first_order)`` of
    one engine path: the fused kernels, the generic path recomputing the
    inner steps (torch.func), or the generic path keeping their graphs."""
    if path == "kept":
        criterion = functional.loss_function(loss)

        def task_forward(params, x, y):
            outputs = torch.func.functional_call(net, functional.flat_to_dict(net, params[0]), (x,))
            return criterion(outputs, y), outputs

        return lambda theta, *args: functional.kept_graph_query_loss(task_forward, [theta], *args)
    derivatives = (
        functional.mlp_derivatives(*functional.mlp_structure(net), loss)
        if path == "fused"
        else functional.module_derivatives(net, loss)
    )
    return lambda *args: functional.maml_query_loss(derivatives, *args)


ENGINE_PATHS = ["fused", "generic", "kept"]


@pytest.mark.parametrize("path", ENGINE_PATHS)
@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
@pytest.mark.parametrize("meta_sgd", [False, True])
@pytest.mark.parametrize("steps", [0, 1, 2, 5])
def test_engine_equals_double_backward(path, loss, meta_sgd, steps):
    """float64, relative error below 1e-9 for theta, the learning rates and
    both inputs (the ANIL pattern: features from a body network)."""
    torch.manual_seed(steps)
    net = mlp_module([2, 9, 7, 3], ["tanh", "elu", "identity"])
    T, n_s, n_q = 4, 5, 7
    x_s = torch.randn(T, n_s, 2, dtype=torch.float64, requires_grad=True)
    x_q = torch.randn(T, n_q, 2, dtype=torch.float64, requires_grad=True)
    y_s = torch.randn(T, n_s, 3, dtype=torch.float64) if loss == "mse" else torch.randint(0, 3, (T, n_s))
    y_q = torch.randn(T, n_q, 3, dtype=torch.float64) if loss == "mse" else torch.randint(0, 3, (T, n_q))
    theta = torch.cat([p.detach().reshape(-1) for p in net.parameters()]).requires_grad_()
    lr = (
        0.05 + 0.4 * torch.rand(theta.numel(), dtype=torch.float64)
        if meta_sgd
        else torch.tensor(0.3, dtype=torch.float64)
    ).requires_grad_()
    weights = torch.rand(T, dtype=torch.float64)
    wrt = [theta, lr, x_s, x_q]
    want_losses, want = double_backward_meta_gradient(net, loss, lr, steps, (x_s, y_s, x_q, y_q), weights, wrt)
    losses = engine_query_losses(path, net, loss)(theta, lr, x_s, y_s, x_q, y_q, steps)
    got = torch.autograd.grad((losses * weights).sum(), wrt, allow_unused=True)
    torch.testing.assert_close(losses, want_losses, rtol=1e-12, atol=0)
    for name, a, b in zip(("theta", "lr", "x_support", "x_query"), got, want):
        assert relative_error(a, b) < 1e-9, (name, relative_error(a, b))


@pytest.mark.parametrize("first_order", [False, True])
def test_maml_query_loss_takes_the_parameters_as_a_list(first_order):
    """theta as the module's parameters (flattened inside, one gradient
    each) equals theta as one flat vector; a part that does not require
    grad gets none."""
    torch.manual_seed(0)
    net = mlp_module([2, 5, 3], ["tanh", "identity"])
    parts = [p.detach().clone().requires_grad_(k != 1) for k, p in enumerate(net.parameters())]
    flat = torch.cat([p.detach().reshape(-1) for p in parts]).requires_grad_()
    x_s, x_q = torch.randn(3, 4, 2, dtype=torch.float64), torch.randn(3, 6, 2, dtype=torch.float64)
    y_s, y_q = torch.randn(3, 4, 3, dtype=torch.float64), torch.randn(3, 6, 3, dtype=torch.float64)
    derivatives = functional.mlp_derivatives(*functional.mlp_structure(net), "mse")
    lr = torch.tensor(0.2, dtype=torch.float64)
    weights = torch.rand(3, dtype=torch.float64)
    losses = functional.maml_query_loss(derivatives, parts, lr, x_s, y_s, x_q, y_q, 2, first_order)
    want = functional.maml_query_loss(derivatives, flat, lr, x_s, y_s, x_q, y_q, 2, first_order)
    torch.testing.assert_close(losses, want, rtol=0, atol=0)
    trainable = [p for p in parts if p.requires_grad]
    got = torch.autograd.grad((losses * weights).sum(), trainable)
    (want_flat,) = torch.autograd.grad((want * weights).sum(), flat)
    expected = [g.view(p.shape) for g, p in zip(want_flat.split([p.numel() for p in parts]), parts) if p.requires_grad]
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # a float32 part among float64 ones: flattened in float64, its gradient in float32
    mixed = [p.detach().float().requires_grad_() if k == 2 else p for k, p in enumerate(parts)]
    losses = functional.maml_query_loss(derivatives, mixed, lr, x_s, y_s, x_q, y_q, 2, first_order)
    got = torch.autograd.grad((losses * weights).sum(), [p for p in mixed if p.requires_grad])
    assert [g.dtype for g in got] == [p.dtype for p in mixed if p.requires_grad]
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b.to(a.dtype), rtol=1e-6, atol=1e-6)
    # one part of any shape is flattened too
    single = flat.detach().view(-1, 1).requires_grad_()
    torch.testing.assert_close(
        functional.maml_query_loss(derivatives, [single], lr, x_s, y_s, x_q, y_q, 2, first_order), want
    )


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("learn_inner_lr", [False, True])
def test_batched_maml_equals_the_per_task_loop(fused, learn_inner_lr):
    torch.manual_seed(0)
    net = mlp_module([1, 12, 12, 1], ["relu", "relu", "identity"])
    tasks = sinusoid_tasks(6, 5, num_query=8, dtype=torch.float64)
    loss = "mse" if fused else (lambda out, y: ((out - y) ** 2).mean())
    bm = BatchedMAML(net, 0.02, inner_steps=3, learn_inner_lr=learn_inner_lr, loss=loss)
    assert bm.fused == fused
    bm(*tasks).backward()
    lrs = list(bm.inner_lrs) if learn_inner_lr else 0.02
    want_loss = reference.maml_query_losses_loop(net, F.mse_loss, lrs, 3, *tasks).mean()
    wrt = list(net.parameters()) + (lrs if learn_inner_lr else [])
    want = torch.autograd.grad(want_loss, wrt)
    for p, w in zip(wrt, want):
        assert relative_error(p.grad, w) < 1e-9


def test_numpy_integer_inner_steps_are_accepted():
    net = mlp_module([1, 10, 1], ["tanh", "identity"])
    tasks = sinusoid_tasks(3, 4, num_query=6, dtype=torch.float64)
    with_numpy = BatchedMAML(net, 0.1, inner_steps=np.int64(2))
    assert with_numpy.inner_steps == 2 and type(with_numpy.inner_steps) is int
    torch.testing.assert_close(with_numpy(*tasks), BatchedMAML(net, 0.1, inner_steps=2)(*tasks))


def test_first_order_batched_maml_equals_the_per_task_loop():
    torch.manual_seed(0)
    net = mlp_module([1, 10, 1], ["tanh", "identity"])
    tasks = sinusoid_tasks(5, 4, num_query=6, dtype=torch.float64)
    BatchedMAML(net, 0.1, inner_steps=2, first_order=True)(*tasks).backward()
    want = torch.autograd.grad(
        reference.maml_query_losses_loop(net, F.mse_loss, 0.1, 2, *tasks, first_order=True).mean(),
        list(net.parameters()),
    )
    for p, w in zip(net.parameters(), want):
        assert relative_error(p.grad, w) < 1e-9


def assert_generic_path_matches_loop(net, inner_lr, x_s, y_s, x_q, y_q, memory="auto", first_order=False):
    """BatchedMAML's generic path (2 inner steps, cross-entropy) gives the
    per-task create_graph loop's meta-gradient."""
    bm = BatchedMAML(net, inner_lr, inner_steps=2, first_order=first_order, loss="cross_entropy", memory=memory)
    assert not bm.fused
    bm(x_s, y_s, x_q, y_q).backward()
    want = torch.autograd.grad(
        reference.maml_query_losses_loop(
            net, F.cross_entropy, inner_lr, 2, x_s, y_s, x_q, y_q, first_order=first_order
        ).mean(),
        list(net.parameters()),
    )
    for p, w in zip(net.parameters(), want):
        assert relative_error(p.grad, w) < 1e-9


@pytest.mark.parametrize("memory", BatchedMAML.MEMORY_POLICIES)
@pytest.mark.parametrize("first_order", [False, True])
def test_batched_maml_generic_path_for_a_conv_learner(memory, first_order):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 4)).double()
    x_s, x_q = torch.randn(2, 4, 1, 6, 6, dtype=torch.float64), torch.randn(2, 8, 1, 6, 6, dtype=torch.float64)
    y_s, y_q = torch.arange(4).repeat(2, 1), torch.arange(4).repeat(2, 2)
    assert_generic_path_matches_loop(net, 0.5, x_s, y_s, x_q, y_q, memory, first_order)


def test_memory_policy_auto_keeps_graphs_for_convolutional_learners_on_the_cpu(monkeypatch):
    """ "auto" keeps the inner graphs where tasks run one at a time (a
    convolutional learner on the CPU), and recomputes for other learners."""
    calls = []
    real = batched_maml.kept_graph_query_loss
    monkeypatch.setattr(batched_maml, "kept_graph_query_loss", lambda *args, **kw: calls.append(1) or real(*args, **kw))
    conv = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2 * 4 * 4, 3)).double()
    x, y = torch.randn(2, 3, 1, 6, 6, dtype=torch.float64), torch.randint(0, 3, (2, 3))
    BatchedMAML(conv, 0.1, loss="cross_entropy")(x, y, x, y)
    assert calls == [1]
    mlp = nn.Sequential(nn.Linear(2, 3), nn.LayerNorm(3)).double()  # generic, not convolutional
    x = torch.randn(2, 3, 2, dtype=torch.float64)
    BatchedMAML(mlp, 0.1, loss="cross_entropy")(x, y, x, y)
    BatchedMAML(mlp, 0.1, loss="cross_entropy", memory="keep")(x, y, x, y)
    assert calls == [1, 1]


@pytest.mark.parametrize("memory", ["keep", "recompute"])
def test_generic_path_nan_stays_in_its_task(memory):
    """A NaN input in one task gives that task a NaN loss and outputs; the
    other tasks' losses and outputs are unchanged."""
    net = conv_learner_with_batch_norm()
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(3, 4, 1, 6, 6, generator=g, **DOUBLE), torch.randint(0, 2, (3, 4), generator=g)
    lr = torch.tensor(0.3, **DOUBLE)

    def task_losses(inputs):
        if memory == "keep":
            return functional.kept_graph_query_loss(
                functional.module_task_forward(net, "cross_entropy"),
                list(net.parameters()),
                lr,
                inputs,
                y,
                inputs,
                y,
                2,
            )
        return functional.maml_query_loss(
            functional.module_derivatives(net, "cross_entropy"), list(net.parameters()), lr, inputs, y, inputs, y, 2
        )

    x_nan = x.clone()
    x_nan[1, 0, 0, 2, 2] = float("nan")
    clean, dirty = task_losses(x), task_losses(x_nan)
    assert dirty[1].isnan() and clean.isfinite().all()
    torch.testing.assert_close(dirty[[0, 2]], clean[[0, 2]])
    bm = BatchedMAML(net, 0.3, 2, loss="cross_entropy", memory=memory)
    clean, dirty = bm(x, y, x, y, return_outputs=True), bm(x_nan, y, x_nan, y, return_outputs=True)
    assert dirty.outputs[1].isnan().all() and clean.outputs.isfinite().all()
    torch.testing.assert_close(dirty.outputs[[0, 2]], clean.outputs[[0, 2]])


def test_kept_graphs_without_gradients_only_adapt():
    """Under no_grad the kept-graph path builds no graph and gives the same losses."""
    net = conv_learner_with_batch_norm()
    x, y = torch.randn(2, 4, 1, 6, 6, **DOUBLE), torch.randint(0, 2, (2, 4))
    bm = BatchedMAML(net, 0.3, 2, loss="cross_entropy", memory="keep")
    with torch.no_grad():
        loss = bm(x, y, x, y)
    assert not loss.requires_grad
    torch.testing.assert_close(
        loss, BatchedMAML(net, 0.3, 2, loss="cross_entropy", memory="recompute")(x, y, x, y).detach()
    )


def test_anil_head_adaptation_trains_the_body():
    """ANIL: BatchedMAML on the head, features from a body the outer loop trains."""
    torch.manual_seed(0)
    body = nn.Sequential(nn.Linear(3, 8), nn.ReLU()).double()
    head = nn.Linear(8, 2).double()
    x_s, x_q = torch.randn(3, 4, 3, dtype=torch.float64), torch.randn(3, 6, 3, dtype=torch.float64)
    y_s, y_q = torch.randint(0, 2, (3, 4)), torch.randint(0, 2, (3, 6))
    BatchedMAML(head, 0.3, inner_steps=2, loss="cross_entropy")(body(x_s), y_s, body(x_q), y_q).backward()

    def per_task():
        losses = []
        for t in range(3):
            fast = list(head.parameters())
            for _ in range(2):
                out = torch.func.functional_call(head, dict(zip(["weight", "bias"], fast)), body(x_s[t]))
                grads = torch.autograd.grad(F.cross_entropy(out, y_s[t]), fast, create_graph=True)
                fast = [p - 0.3 * g for p, g in zip(fast, grads)]
            out = torch.func.functional_call(head, dict(zip(["weight", "bias"], fast)), body(x_q[t]))
            losses.append(F.cross_entropy(out, y_q[t]))
        return torch.stack(losses).mean()

    params = list(body.parameters()) + list(head.parameters())
    for p, w in zip(params, torch.autograd.grad(per_task(), params)):
        assert relative_error(p.grad, w) < 1e-9


def test_anil_module_equals_batched_maml_on_the_head_fed_by_the_body():
    torch.manual_seed(0)
    body = nn.Sequential(nn.Linear(3, 8), nn.ReLU()).double()
    head = nn.Sequential(nn.Linear(8, 2)).double()
    anil = ANIL(body, head, 0.3, inner_steps=2)
    assert anil.head.fused
    x_s, x_q = torch.randn(3, 4, 3, dtype=torch.float64), torch.randn(3, 6, 3, dtype=torch.float64)
    y_s, y_q = torch.randint(0, 2, (3, 4)), torch.randint(0, 2, (3, 6))
    loss = anil(x_s, y_s, x_q, y_q)
    params = list(anil.parameters())
    got = torch.autograd.grad(loss, params)
    want_loss = BatchedMAML(head, 0.3, inner_steps=2, loss="cross_entropy")(body(x_s), y_s, body(x_q), y_q)
    torch.testing.assert_close(loss, want_loss)
    for a, b in zip(got, torch.autograd.grad(want_loss, params)):
        torch.testing.assert_close(a, b)
    predicted = anil.predict(x_s, y_s, x_q)
    assert predicted.shape == (3, 6, 2)
    torch.testing.assert_close(predicted, anil.head.predict(body(x_s), y_s, body(x_q)))
    with pytest.raises(
        ValueError,
        match=r"ANIL: the body must return \[n, D\] features, got shape "
        r"\[12, 8, 1\]",
    ):
        ANIL(nn.Sequential(body, nn.Unflatten(1, (8, 1))), head, 0.3)(x_s, y_s, x_q, y_q)
    with pytest.raises(ValueError, match=r"ANIL: inputs must be \[T, N, ...\]"):
        anil(x_s[0, 0], y_s, x_q, y_q)


def test_anil_computes_the_bodys_convolutions_channels_last_with_the_same_gradients():
    torch.manual_seed(0)
    body = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten()).double()
    head = nn.Linear(3 * 4 * 4, 2).double()
    layouts = []
    body[0].register_forward_pre_hook(
        lambda conv, args: layouts.append(conv.weight.is_contiguous(memory_format=torch.channels_last))
    )
    anil = ANIL(body, head, 0.3, inner_steps=2)
    x_s, x_q = torch.randn(3, 4, 2, 6, 6, **DOUBLE), torch.randn(3, 5, 2, 6, 6, **DOUBLE)
    y_s, y_q = torch.randint(0, 2, (3, 4)), torch.randint(0, 2, (3, 5))
    params = list(anil.parameters())
    got = torch.autograd.grad(anil(x_s, y_s, x_q, y_q), params)
    assert layouts == [True, True]

    def features(x):
        return body(x.flatten(0, 1)).unflatten(0, x.shape[:2])

    want = torch.autograd.grad(anil.head(features(x_s), y_s, features(x_q), y_q), params)
    assert layouts == [True, True, False, False]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("learner", ["mlp", "conv"])
def test_return_outputs_gives_the_query_outputs_and_accuracy_of_the_same_adaptation(learner):
    torch.manual_seed(0)
    if learner == "mlp":
        net = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2)).double()
        x_s, x_q = torch.randn(3, 4, 3, dtype=torch.float64), torch.randn(3, 6, 3, dtype=torch.float64)
    else:
        net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(8, 2)).double()
        x_s = torch.randn(3, 4, 1, 4, 4, dtype=torch.float64)
        x_q = torch.randn(3, 6, 1, 4, 4, dtype=torch.float64)
    y_s, y_q = torch.randint(0, 2, (3, 4)), torch.randint(0, 2, (3, 6))
    for model in (
        BatchedMAML(net, 0.3, inner_steps=2, loss="cross_entropy"),
        iMAML(net, 0.1, inner_steps=3, lam=1.0, cg_steps=2, loss="cross_entropy"),
    ):
        out = model(x_s, y_s, x_q, y_q, return_outputs=True)
        torch.testing.assert_close(out.loss, model(x_s, y_s, x_q, y_q))
        expected = model.predict(x_s, y_s, x_q, steps=model.inner_steps)
        torch.testing.assert_close(out.outputs, expected)
        assert not out.outputs.requires_grad and out.loss.requires_grad
        torch.testing.assert_close(out.accuracy, (expected.argmax(-1) == y_q).double().mean())
        queries = F.cross_entropy(out.outputs.flatten(0, 1), y_q.flatten(), reduction="none")
        torch.testing.assert_close(out.loss, queries.view(3, 6).mean(1).mean())
    mse = BatchedMAML(nn.Linear(3, 1).double(), 0.1)
    out = mse(
        x_s.flatten(2)[..., :3],
        torch.zeros(3, 4, 1, dtype=torch.float64),
        x_q.flatten(2)[..., :3],
        torch.zeros(3, 6, 1, dtype=torch.float64),
        return_outputs=True,
    )
    assert out.accuracy is None and out.outputs.shape == (3, 6, 1)


class DistanceHead(nn.Module):
    """A learner containing a fastmeta op: logits are minus squared distances
    to learned class centres (a metric head inside MAML)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(3, 4)
        self.centres = nn.Parameter(torch.randn(2, 4))

    def forward(self, x):
        return -ops.pairwise_distance(self.embed(x), self.centres)


def test_generic_path_runs_learners_that_contain_fastmeta_ops():
    torch.manual_seed(0)
    net = DistanceHead().double()
    x_s, x_q = torch.randn(3, 4, 3, dtype=torch.float64), torch.randn(3, 6, 3, dtype=torch.float64)
    y_s, y_q = torch.randint(0, 2, (3, 4)), torch.randint(0, 2, (3, 6))
    assert_generic_path_matches_loop(net, 0.3, x_s, y_s, x_q, y_q)


@pytest.mark.parametrize("memory", [None, "keep", "recompute"])  # None: fused kernels
def test_batched_maml_does_not_adapt_frozen_parameters(memory):
    torch.manual_seed(0)
    net = mlp_module([1, 6, 1], ["relu", "identity"])
    net[0].weight.requires_grad_(False)
    tasks = sinusoid_tasks(3, 5, num_query=5, dtype=torch.float64)
    loss = "mse" if memory is None else (lambda out, y: ((out - y) ** 2).mean())
    bm = BatchedMAML(net, 0.1, inner_steps=2, loss=loss, memory=memory or "auto")
    assert bm.fused == (memory is None)
    adapted = bm.adapt(tasks[0], tasks[1])
    assert torch.equal(adapted["0.weight"], net[0].weight.expand(3, -1, -1))
    assert not torch.equal(adapted["0.bias"], net[0].bias.expand(3, -1))
    outputs = bm(*tasks, return_outputs=True)
    torch.testing.assert_close(outputs.outputs, bm.predict(tasks[0], tasks[1], tasks[2]))
    outputs.loss.backward()
    assert net[0].weight.grad is None and net[0].bias.grad is not None
    twin = copy.deepcopy(net).requires_grad_()  # the frozen weight: learning rate 0
    want = torch.autograd.grad(
        reference.maml_query_losses_loop(twin, F.mse_loss, [0.0, 0.1, 0.1, 0.1], 2, *tasks).mean(),
        list(twin.parameters())[1:],
    )
    for p, w in zip(list(net.parameters())[1:], want):
        assert relative_error(p.grad, w) < 1e-9


def test_adapt_and_predict_match_manual_adaptation():
    torch.manual_seed(0)
    net = mlp_module([1, 8, 1], ["tanh", "identity"])
    x_s, y_s, x_q, _ = sinusoid_tasks(3, 5, num_query=4, dtype=torch.float64)
    bm = BatchedMAML(net, 0.05, inner_steps=3)
    predictions = bm.predict(x_s, y_s, x_q)
    for t in range(3):
        fast = [p.detach().clone().requires_grad_() for p in net.parameters()]
        for _ in range(3):
            out = torch.func.functional_call(net, dict(zip(["0.weight", "0.bias", "2.weight", "2.bias"], fast)), x_s[t])
            grads = torch.autograd.grad(F.mse_loss(out, y_s[t]), fast)
            fast = [(p - 0.05 * g).detach().requires_grad_() for p, g in zip(fast, grads)]
        want = torch.func.functional_call(net, dict(zip(["0.weight", "0.bias", "2.weight", "2.bias"], fast)), x_q[t])
        torch.testing.assert_close(predictions[t], want)


def test_reptile_moves_towards_the_mean_adapted_parameters():
    torch.manual_seed(0)
    net = mlp_module([1, 8, 1], ["relu", "identity"])
    x, y = sinusoid_tasks(4, 6, dtype=torch.float64)
    reptile = Reptile(net, inner_lr=0.05, inner_steps=3, outer_lr=0.5)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    adapted = reptile.adapt(x, y)
    initial = reptile.step(x, y)
    for name, p in net.named_parameters():
        torch.testing.assert_close(p.detach(), before[name] + 0.5 * (adapted[name].mean(0) - before[name]))
    want = torch.stack([F.mse_loss(torch.func.functional_call(net, before, (x[t],)), y[t]) for t in range(4)]).mean()
    torch.testing.assert_close(initial, want)


def test_reptile_on_a_conv_learner_with_batch_norm_equals_the_plain_loop():
    """Reptile's conv-learner path (tasks one at a time, per-task batch
    statistics) equals fastmeta.reference's plain task-by-task loop, the
    benchmark's baseline."""
    net = conv_learner_with_batch_norm()
    twin = copy.deepcopy(net)
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(3, 4, 1, 6, 6, generator=g, **DOUBLE), torch.randint(0, 2, (3, 4), generator=g)
    Reptile(net, inner_lr=0.2, inner_steps=3, outer_lr=1.0, loss="cross_entropy").step(x, y)
    with functional.batch_statistics(twin):
        want = reference.reptile_mean_adapted_loop(twin, F.cross_entropy, 0.2, 3, x, y)
    for p, w in zip(net.parameters(), want):
        torch.testing.assert_close(p.detach(), w, rtol=1e-12, atol=1e-12)


def test_reptile_computes_a_conv_learners_convolutions_channels_last():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 2)).double()
    layouts = []
    net[0].register_forward_pre_hook(
        lambda conv, args: layouts.append(conv.weight.is_contiguous(memory_format=torch.channels_last))
    )
    x, y = torch.randn(3, 4, 2, 6, 6, **DOUBLE), torch.randint(0, 2, (3, 4))
    Reptile(net, inner_lr=0.2, inner_steps=2, outer_lr=1.0, loss="cross_entropy").step(x, y)
    assert layouts == [True] * 3 * 2


@pytest.mark.parametrize("learner, first_order", [("maml", False), ("maml", True), ("imaml", False)])
def test_kept_graphs_compute_support_forwards_differentiated_twice_in_the_default_layout(learner, first_order):
    """Where tasks run one at a time, convolutions are channels-last, except
    in a support forward whose graph is differentiated twice (second-order
    MAML's inner steps, iMAML's Hessian-vector products): PyTorch's
    batch-norm double backward is slow on channels-last tensors."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(2, 3, 3),
        nn.BatchNorm2d(3, track_running_stats=False),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(3 * 4 * 4, 2),
    ).double()
    forwards = []  # (batch size, channels-last weight) of every forward through the learner
    net[0].register_forward_pre_hook(
        lambda conv, args: forwards.append(
            (args[0].shape[0], conv.weight.is_contiguous(memory_format=torch.channels_last))
        )
    )
    support, query = 4, 6
    x_s, x_q = torch.randn(2, support, 2, 6, 6, **DOUBLE), torch.randn(2, query, 2, 6, 6, **DOUBLE)
    y_s, y_q = torch.randint(0, 2, (2, support)), torch.randint(0, 2, (2, query))
    if learner == "maml":
        meta = BatchedMAML(net, 0.1, 2, first_order=first_order, loss="cross_entropy")
    else:
        meta = iMAML(net, 0.1, 2, cg_steps=2, loss="cross_entropy")
    meta(x_s, y_s, x_q, y_q).backward()
    assert {f for f in forwards if f[0] == query} == {(query, True)}
    if learner == "maml":  # 2 tasks of 2 inner steps
        assert forwards.count((support, first_order)) == 2 * 2 and len(forwards) == 2 * 2 + 2
    else:  # 2 inner steps per task, then the forward of its Hessian-vector products
        assert forwards.count((support, True)) == 2 * 2 and forwards.count((support, False)) == 2


def test_batched_hvp_equals_per_task_hessians():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1)).double()
    params, _ = torch.func.stack_module_state([net, mlp_module([2, 3, 1], ["tanh", "identity"])])
    vector = {n: torch.randn_like(p) for n, p in params.items()}
    x, y = torch.randn(2, 5, 2, dtype=torch.float64), torch.randn(2, 5, 1, dtype=torch.float64)
    loss, grad, hvp = functional.batched_hvp(net, params, vector, x, y, F.mse_loss)
    names = list(params)
    for t in range(2):
        flat = torch.cat([params[n][t].reshape(-1) for n in names])
        f = lambda p: F.mse_loss(torch.func.functional_call(net, functional.flat_to_dict(net, p), (x[t],)), y[t])
        h = torch.autograd.functional.hessian(f, flat)
        v = torch.cat([vector[n][t].reshape(-1) for n in names])
        torch.testing.assert_close(torch.cat([hvp[n][t].reshape(-1) for n in names]), h @ v)
        torch.testing.assert_close(loss[t], f(flat))


def test_sinusoid_tasks():
    x_s, y_s, x_q, y_q, amp, phase = sinusoid_tasks(
        50, 10, num_query=7, return_parameters=True, generator=torch.Generator().manual_seed(0)
    )
    assert x_s.shape == (50, 10, 1) and y_q.shape == (50, 7, 1)
    assert x_s.min() >= -5 and x_s.max() <= 5
    assert amp.min() >= 0.1 and amp.max() <= 5 and phase.min() >= 0 and phase.max() <= torch.pi
    torch.testing.assert_close(y_s, amp.view(-1, 1, 1) * torch.sin(x_s - phase.view(-1, 1, 1)))


# --- learn2learn-style MAML and MetaSGD ---------------------------------------------------------


def test_maml_clone_adapt_and_meta_gradient():
    torch.manual_seed(0)
    net = mlp_module([1, 8, 1], ["relu", "identity"])
    maml = MAML(net, lr=0.1)
    before = [p.detach().clone() for p in net.parameters()]
    x_s, y_s, x_q, y_q = sinusoid_tasks(3, 5, num_query=5, dtype=torch.float64)
    total = 0
    for t in range(3):
        learner = maml.clone()
        support_loss = F.mse_loss(learner(x_s[t]), y_s[t])
        grads = torch.autograd.grad(support_loss, list(learner.parameters()), retain_graph=True)
        old = [p.detach().clone() for p in learner.parameters()]
        learner.adapt(support_loss)
        for p, o, g in zip(learner.parameters(), old, grads):
            torch.testing.assert_close(p.detach(), o - 0.1 * g)  # adapt updates
        total = total + F.mse_loss(learner(x_q[t]), y_q[t])
    for p, b in zip(net.parameters(), before):
        assert torch.equal(p.detach(), b)  # clone leaves the original unchanged
    (total / 3).backward()
    want = torch.autograd.grad(
        reference.maml_query_losses_loop(net, F.mse_loss, 0.1, 1, x_s, y_s, x_q, y_q).mean(), list(net.parameters())
    )
    for p, w in zip(net.parameters(), want):
        assert relative_error(p.grad, w) < 1e-12


def test_maml_first_order_uses_the_adapted_gradient():
    torch.manual_seed(0)
    net = mlp_module([1, 8, 1], ["tanh", "identity"])
    x_s, y_s, x_q, y_q = sinusoid_tasks(1, 5, num_query=5, dtype=torch.float64)
    learner = MAML(net, lr=0.1, first_order=True).clone()
    learner.adapt(F.mse_loss(learner(x_s[0]), y_s[0]))
    F.mse_loss(learner(x_q[0]), y_q[0]).backward()
    adapted = {n: p.detach().requires_grad_() for n, p in learner.module.named_parameters()}
    want = torch.autograd.grad(
        F.mse_loss(torch.func.functional_call(net, adapted, (x_q[0],)), y_q[0]), list(adapted.values())
    )
    for p, w in zip(net.parameters(), want):
        torch.testing.assert_close(p.grad, w)


def test_maml_unused_parameters_raise_unless_allowed():
    net = nn.ModuleDict({"used": nn.Linear(2, 1), "unused": nn.Linear(2, 1)})
    x = torch.randn(4, 2)
    learner = MAML(net, lr=0.1).clone()
    with pytest.raises(RuntimeError, match="allow_unused=True"):
        learner.adapt(learner.module["used"](x).pow(2).mean())
    learner = MAML(net, lr=0.1, allow_unused=True).clone()
    learner.adapt(learner.module["used"](x).pow(2).mean())
    assert torch.equal(learner.module["unused"].weight, net["unused"].weight)
    assert not torch.equal(learner.module["used"].weight, net["used"].weight)


def test_maml_parameters_without_grad_raise_unless_allowed():
    net = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1))
    net[0].weight.requires_grad_(False)
    x = torch.randn(4, 2)
    learner = MAML(net, lr=0.1).clone()
    with pytest.raises(RuntimeError, match="do not require grad.*allow_nograd=True"):
        learner.adapt(learner(x).pow(2).mean())
    learner = MAML(net, lr=0.1, allow_nograd=True).clone()
    learner.adapt(learner(x).pow(2).mean())
    assert torch.equal(learner.module[0].weight, net[0].weight)


def test_meta_sgd_learns_its_learning_rates():
    torch.manual_seed(0)
    net = mlp_module([1, 8, 1], ["relu", "identity"])
    meta = MetaSGD(net, lr=0.05)
    x_s, y_s, x_q, y_q = sinusoid_tasks(2, 5, num_query=5, dtype=torch.float64)
    total = 0
    for t in range(2):
        learner = meta.clone()
        learner.adapt(F.mse_loss(learner(x_s[t]), y_s[t]))
        total = total + F.mse_loss(learner(x_q[t]), y_q[t])
    (total / 2).backward()
    lrs = list(meta.lrs)
    want = torch.autograd.grad(
        reference.maml_query_losses_loop(net, F.mse_loss, lrs, 1, x_s, y_s, x_q, y_q).mean(),
        list(net.parameters()) + lrs,
    )
    for p, w in zip(list(net.parameters()) + lrs, want):
        assert relative_error(p.grad, w) < 1e-12


# --- bad input ----------------------------------------------------------------------------------


def sinusoid_bm():
    return BatchedMAML(nn.Sequential(nn.Linear(1, 4), nn.ReLU(), nn.Linear(4, 1)), 0.01)


def test_bad_input_task_count_mismatch():
    x_s, y_s, x_q, y_q = sinusoid_tasks(4, 5, num_query=5)
    with pytest.raises(ValueError, match=r"number of tasks differs.*x_query \(3\)"):
        sinusoid_bm()(x_s, y_s, x_q[:3], y_q[:3])


def test_flat_to_dict_splits_in_order_and_rejects_a_wrong_size():
    net = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
    flat = torch.arange(13.0).expand(4, -1)
    parts = functional.flat_to_dict(net, flat)
    assert list(parts) == ["0.weight", "0.bias", "1.weight", "1.bias"]
    torch.testing.assert_close(parts["0.weight"][2], torch.arange(6.0).view(3, 2))
    torch.testing.assert_close(parts["1.bias"], torch.full((4, 1), 12.0))
    with pytest.raises(ValueError, match=r"flat must be \[\.\.\., 13\]"):
        functional.flat_to_dict(net, torch.zeros(12))


def test_bad_input_unknown_loss():
    with pytest.raises(ValueError, match="unknown loss 'hinge'"):
        BatchedMAML(nn.Linear(1, 1), 0.01, loss="hinge")
    with pytest.raises(ValueError, match="unknown loss 'l1'"):
        fastmeta.ops.mlp_task_derivatives(
            torch.zeros(1, 2),
            torch.zeros(1, 1, 1),
            torch.zeros(1, 1, 1),
            widths=[1, 1],
            activations=["identity"],
            loss="l1",
        )


def test_bad_input_unknown_memory_policy():
    with pytest.raises(ValueError, match="unknown memory policy 'low'; expected one of 'auto'"):
        BatchedMAML(nn.Linear(1, 1), 0.01, memory="low")


def test_bad_input_empty_support_set():
    x_s, y_s, x_q, y_q = sinusoid_tasks(2, 0, num_query=5)
    with pytest.raises(ValueError, match="support set is empty"):
        sinusoid_bm()(x_s, y_s, x_q, y_q)


def test_bad_input_targets_that_require_grad():
    x_s, y_s, x_q, y_q = sinusoid_tasks(2, 3, num_query=3)
    with pytest.raises(ValueError, match="targets that require grad"):
        sinusoid_bm()(x_s, y_s.requires_grad_(), x_q, y_q)


def test_bad_input_labels_out_of_range():
    bm = BatchedMAML(nn.Linear(3, 4), 0.1, loss="cross_entropy")
    x = torch.randn(2, 5, 3)
    labels = torch.randint(0, 4, (2, 5))
    labels[1, 3] = 4
    with pytest.raises(RuntimeError, match=r"target\[1, 3\] = 4 is out of range for 4 classes"):
        bm(x, labels, x, labels.clamp(max=3))
    with pytest.raises(RuntimeError, match="must have dtype torch.int64"):
        bm(x, labels.float(), x, labels)


def test_bad_input_op_operands():
    op = torch.ops.fastmeta.mlp_task_derivatives
    params, x, target = torch.zeros(2, 9), torch.zeros(2, 3, 2), torch.zeros(2, 3, 1)
    widths, acts = [2, 2, 1], ["relu", "identity"]
    with pytest.raises(RuntimeError, match="params has size 8 in dimension 1 but the number of parameters"):
        op(params[:, :8], x, target, None, widths, acts, "mse", False)
    with pytest.raises(RuntimeError, match="x must have dtype Double"):
        op(params.double(), x, target, None, widths, acts, "mse", False)
    with pytest.raises(RuntimeError, match="unknown activation 'gelu'"):
        op(params, x, target, None, widths, ["gelu", "identity"], "mse", False)
    with pytest.raises(RuntimeError, match="2 linear layers need 2 activations"):
        op(params, x, target, None, widths, ["relu"], "mse", False)
    with pytest.raises(RuntimeError, match="target has size 2 in dimension 2"):
        op(params, x, torch.zeros(2, 3, 2), None, widths, acts, "mse", False)
    with pytest.raises(RuntimeError, match="direction has size 3 in dimension 0"):
        op(params, x, target, torch.zeros(3, 9), widths, acts, "mse", False)
    with pytest.raises(RuntimeError, match="params must be float32 or float64"):
        op(params.half(), x.half(), target.half(), None, widths, acts, "mse", False)
    with pytest.raises(RuntimeError, match="1 to 8 linear layers"):
        op(params, x, target, None, [2], [], "mse", False)


def test_a_retained_graph_gives_the_same_meta_gradient_twice():
    x_s, y_s, x_q, y_q = sinusoid_tasks(2, 3, num_query=3)
    bm = sinusoid_bm()
    loss = bm(x_s, y_s, x_q, y_q)
    first = torch.autograd.grad(loss, list(bm.parameters()), retain_graph=True)
    second = torch.autograd.grad(loss, list(bm.parameters()))
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("path", ENGINE_PATHS)
@pytest.mark.parametrize("first_order", [False, True])
def test_engine_gradcheck(path, first_order):
    """torch.autograd.gradcheck (float64) of the engine's meta-gradient with
    respect to theta, per-parameter learning rates and both inputs."""
    torch.manual_seed(0)
    net = mlp_module([2, 5, 3], ["tanh", "identity"])
    engine = engine_query_losses(path, net, "cross_entropy")
    theta = torch.cat([p.detach().reshape(-1) for p in net.parameters()]).requires_grad_()
    lr = (0.1 + 0.2 * torch.rand(theta.numel(), dtype=torch.float64)).requires_grad_()
    x_s = torch.randn(3, 4, 2, dtype=torch.float64, requires_grad=True)
    x_q = torch.randn(3, 5, 2, dtype=torch.float64, requires_grad=True)
    y_s, y_q = torch.randint(0, 3, (3, 4)), torch.randint(0, 3, (3, 5))

    def query_losses(theta, lr, x_s, x_q):
        return engine(theta, lr, x_s, y_s, x_q, y_q, 2, first_order)

    if first_order:  # FOMAML's gradient is not the true one; check it is the first-order one
        losses = query_losses(theta, lr, x_s, x_q)
        assert torch.autograd.grad(losses.sum(), x_s, allow_unused=True)[0] is None
        return
    assert torch.autograd.gradcheck(query_losses, (theta, lr, x_s, x_q))


class WithFeatures(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Linear(3, 4)
        self.head = nn.Linear(4, 2)
        self.scale = 2.0

    def forward(self, x):
        return self.head(torch.tanh(self.features(x))) * self.scale


@pytest.mark.parametrize("wrapper", [lambda m: MAML(m, lr=0.1), lambda m: MetaSGD(m, lr=0.1)])
def test_wrappers_pass_the_module_attributes_through(wrapper):
    model = WithFeatures()
    learner = wrapper(model)
    assert learner.features is model.features and learner.scale == 2.0
    clone = learner.clone()
    assert isinstance(clone.features, nn.Linear) and clone.head.out_features == 2
    with pytest.raises(AttributeError, match="no_such_thing"):
        learner.no_such_thing


def test_meta_sgd_keeps_non_leaf_learning_rates_in_the_graph():
    torch.manual_seed(0)
    net = WithFeatures()
    base = nn.Parameter(torch.tensor(0.1))
    lrs = [base * torch.ones_like(p) for p in net.parameters()]
    meta = MetaSGD(net, lrs=lrs)
    assert all(a is b for a, b in zip(meta.lrs, lrs))
    x, y = torch.randn(5, 3), torch.randn(5, 2)
    learner = meta.clone()
    learner.adapt(F.mse_loss(learner(x), y))
    F.mse_loss(learner(x), y).backward()
    # d/d base of L(theta - base * g) is -g . grad L(theta'), the same for every entry's rate
    assert base.grad is not None and base.grad.abs() > 0
    with pytest.raises(ValueError, match="MetaSGD: 1 learning rates for the module's 4 parameters"):
        MetaSGD(net, lrs=lrs[:1])


def test_functional_updates_equal_the_wrappers_steps():
    torch.manual_seed(0)
    x, y = torch.randn(5, 3), torch.randn(5, 2)
    net = WithFeatures()
    stepped = MAML(net, lr=0.3).clone()
    stepped.adapt(F.mse_loss(stepped(x), y))
    functional = clone_module(net)
    grads = torch.autograd.grad(F.mse_loss(functional(x), y), list(functional.parameters()), create_graph=True)
    maml_update(functional, 0.3, grads)
    for a, b in zip(stepped.parameters(), functional.parameters()):
        torch.testing.assert_close(a, b)
    lrs = [torch.full_like(p, 0.05 * (i + 1)) for i, p in enumerate(net.parameters())]
    meta = MetaSGD(net, lrs=[lr.clone() for lr in lrs]).clone()
    meta.adapt(F.mse_loss(meta(x), y))
    functional = clone_module(net)
    grads = torch.autograd.grad(F.mse_loss(functional(x), y), list(functional.parameters()))
    meta_sgd_update(functional, lrs, grads)
    for a, b in zip(meta.parameters(), functional.parameters()):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="grads: 3 given for the model's 4 parameters"):
        maml_update(clone_module(net), 0.1, grads[:3])
    with pytest.raises(ValueError, match="lrs: 2 given for the model's 4 parameters"):
        meta_sgd_update(clone_module(net), lrs[:2], grads)


def conv_learner_with_batch_norm(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 2)
    ).double()


@pytest.mark.parametrize("steps", [1, 5])
@pytest.mark.parametrize("learn_inner_lr", [False, True])
@pytest.mark.parametrize("memory", ["keep", "recompute"])
def test_batched_maml_with_a_default_batch_norm_equals_the_per_task_loop(steps, learn_inner_lr, memory):
    """A default nn.BatchNorm2d (running statistics tracked, training mode):
    each task is normalised with its own batch statistics, the meta-gradient
    equals double backward through the per-task loop (float64), and the
    running statistics take one update per task from its support set."""
    net = conv_learner_with_batch_norm()
    twin, stats_twin = copy.deepcopy(net), copy.deepcopy(net)
    g = torch.Generator().manual_seed(3)
    x_s, x_q = torch.randn(3, 4, 1, 6, 6, generator=g, **DOUBLE), torch.randn(3, 6, 1, 6, 6, generator=g, **DOUBLE)
    y_s, y_q = torch.randint(0, 2, (3, 4), generator=g), torch.randint(0, 2, (3, 6), generator=g)
    bm = BatchedMAML(net, 0.3, steps, learn_inner_lr=learn_inner_lr, loss="cross_entropy", memory=memory)
    loss = bm(x_s, y_s, x_q, y_q)
    wrt = list(net.parameters()) + (list(bm.inner_lrs) if learn_inner_lr else [])
    got = torch.autograd.grad(loss, wrt)
    lrs = [lr.detach().clone().requires_grad_() for lr in bm.inner_lrs] if learn_inner_lr else 0.3
    want_loss = reference.maml_query_losses_loop(twin, F.cross_entropy, lrs, steps, x_s, y_s, x_q, y_q).mean()
    want = torch.autograd.grad(want_loss, list(twin.parameters()) + (lrs if learn_inner_lr else []))
    torch.testing.assert_close(loss, want_loss, rtol=1e-12, atol=0)
    # all gradients together: the convolution's bias before batch norm has a
    # zero gradient in exact arithmetic (rounding noise on both sides)
    got, want = torch.cat([a.reshape(-1) for a in got]), torch.cat([b.reshape(-1) for b in want])
    assert ((got - want).norm() / want.norm()).item() < 1e-9
    with torch.no_grad():
        for task in x_s:
            stats_twin(task)
    for name in ("1.running_mean", "1.running_var", "1.num_batches_tracked"):
        torch.testing.assert_close(net.get_buffer(name), stats_twin.get_buffer(name))
    net.eval()  # running statistics then normalise, inside the transforms too
    assert torch.isfinite(bm(x_s, y_s, x_q, y_q))
    assert net[1].num_batches_tracked.item() == 3


@pytest.mark.parametrize("shared", [False, True])
def test_task_derivatives_one_task_at_a_time_equal_the_vmapped_ones(shared):
    """On the CPU a convolutional learner's tasks are computed one after the
    other (grouped convolutions are slower there); both ways agree."""
    net = conv_learner_with_batch_norm()
    engine = functional
    theta = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
    params = theta if shared else theta + 0.01 * torch.randn(3, theta.numel(), **DOUBLE)
    x, y = torch.randn(3, 4, 1, 6, 6, **DOUBLE), torch.randint(0, 2, (3, 4))
    direction = torch.randn(3, theta.numel(), **DOUBLE)

    def task_loss(p, xt, yt):
        return F.cross_entropy(torch.func.functional_call(net, engine.flat_to_dict(net, p), (xt,)), yt)

    with engine.batch_statistics(net):
        for d in (direction, None):  # None: gradients only (PyTorch autograd task by task)
            for input_grad in (True, False):
                a = engine.task_derivatives(task_loss, params, x, y, d, input_grad, vectorize=True)
                b = engine.task_derivatives(task_loss, params, x, y, d, input_grad, vectorize=False)
                for u, v in zip(a, b):
                    torch.testing.assert_close(u, v)
