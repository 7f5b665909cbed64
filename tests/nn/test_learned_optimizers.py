"""The coordinatewise LSTM ops (L2O cell, in-place step, Ravi & Larochelle
meta-learner) against nn.LSTMCell compositions, and the modules built on them."""

import copy
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

import fastmeta
from fastmeta import ops, reference
from fastmeta.testing import DEVICES, FLOAT_DTYPES, assert_close_to_reference, compare_with_reference

# (num_layers, hidden_size, P): P around the 256-coordinate chunk, empty and size 1.
L2O_SHAPES = [(2, 20, 1000), (1, 1, 1), (1, 3, 7), (3, 5, 257), (2, 4, 0), (2, 20, 256), (2, 7, 513)]


def gradient_like(P, dtype, device, generator=None):
    """Gradients over many magnitudes, both sides of the e^-p preprocessing threshold."""
    scale = torch.logspace(-9, 1, max(P, 1), dtype=torch.float64)[:P]
    g = torch.randn(P, dtype=torch.float64, generator=generator) * scale[torch.randperm(P, generator=generator)]
    return g.to(device=device, dtype=dtype)


def l2o_inputs(L, H, P, dtype, device, requires_grad=True):
    gen = torch.Generator().manual_seed(L * 1000 + H * 10 + P)
    grad = gradient_like(P, dtype, device, gen)
    state = (0.5 * torch.randn(L, 2, H, P, generator=gen, dtype=torch.float64)).to(device, dtype)
    weights = (0.3 * torch.randn(ops.l2o_num_weights(L, H), generator=gen, dtype=torch.float64)).to(device, dtype)
    return [t.requires_grad_(requires_grad) for t in (grad, state, weights)]


def meta_inputs(H, P, dtype, device):
    gen = torch.Generator().manual_seed(H * 10 + P)
    grad = gradient_like(P, dtype, device, gen)
    loss = torch.tensor(0.7, dtype=dtype, device=device)
    theta = torch.randn(P, generator=gen, dtype=torch.float64).to(device, dtype)
    state = torch.rand(2 * H + 2, P, generator=gen, dtype=torch.float64).to(device, dtype)
    weights = (0.3 * torch.randn(ops.meta_lstm_num_weights(H), generator=gen, dtype=torch.float64)).to(device, dtype)
    return [t.requires_grad_() for t in (grad, loss, theta, state, weights)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("L, H, P", L2O_SHAPES)
def test_l2o_step_matches_reference(device, dtype, L, H, P):
    inputs = l2o_inputs(L, H, P, dtype, device)
    compare_with_reference(
        lambda *a: ops.l2o_lstm_step(*a, 7.0, 0.3), lambda *a: reference.l2o_lstm_step(*a, 7.0, 0.3), inputs
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("H, P", [(20, 1000), (1, 1), (3, 0), (5, 257)])
def test_meta_step_matches_reference(device, dtype, H, P):
    compare_with_reference(ops.meta_lstm_step, reference.meta_lstm_step, meta_inputs(H, P, dtype, device))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_in_place_step_equals_functional_step(device, dtype):
    grad, state, weights = l2o_inputs(2, 20, 1000, dtype, device, requires_grad=False)
    param = torch.randn(1000, dtype=dtype, device=device)
    update, new_state = ops.l2o_lstm_step(grad, state, weights)
    expected_param = param + update
    ops.l2o_lstm_step_(param, grad, state, weights)
    torch.testing.assert_close(param, expected_param, rtol=0, atol=0)
    torch.testing.assert_close(state, new_state, rtol=0, atol=0)


def test_large_outputs_reuse_freed_buffers_and_match_reference():
    """CPU outputs of 64 KiB and more are written into recycled buffers: the
    freed ones of the step before, still holding its (here NaN) values, which
    the next step overwrites entirely."""
    P = 60000  # float64 state: 38.4 MB
    g = torch.Generator().manual_seed(0)
    grad = torch.randn(P, dtype=torch.float64, generator=g) * 1e-2
    state = (0.5 * torch.randn(2, 2, 20, P, dtype=torch.float64, generator=g)).requires_grad_()
    weights = (0.3 * torch.randn(ops.l2o_num_weights(2, 20), dtype=torch.float64, generator=g)).requires_grad_()
    ops.release_recycled_buffers()
    nan_outputs = ops.l2o_lstm_step(grad, torch.full_like(state, float("nan")), weights.detach())
    assert nan_outputs[1].isnan().all()
    nan_state_buffer = nan_outputs[1].data_ptr()
    del nan_outputs

    outputs = ops.l2o_lstm_step(grad, state, weights)
    assert outputs[1].data_ptr() == nan_state_buffer
    expected = reference.l2o_lstm_step(grad, state, weights)
    for a, e in zip(outputs, expected):
        assert_close_to_reference(a, e)
    upstream = [torch.randn_like(e) for e in expected]
    got = torch.autograd.grad(outputs, (state, weights), upstream)
    want = torch.autograd.grad(expected, (state, weights), upstream)
    for a, e in zip(got, want):
        assert_close_to_reference(a, e)
    del outputs, got
    # The new state, the update and their gradients.
    assert ops.release_recycled_buffers() == 2 * state.nbytes + 2 * grad.nbytes
    assert ops.release_recycled_buffers() == 0


def test_meta_lstm_large_outputs_reuse_freed_buffers_and_match_reference():
    P, H = 110000, 20  # float64 state: 37 MB
    g = torch.Generator().manual_seed(0)
    grad, theta = (torch.randn(P, dtype=torch.float64, generator=g) for _ in range(2))
    loss = torch.tensor(1.5, dtype=torch.float64)
    state = 0.1 * torch.randn(2 * H + 2, P, dtype=torch.float64, generator=g)
    weights = 0.1 * torch.randn(ops.meta_lstm_num_weights(H), dtype=torch.float64, generator=g)
    nan_outputs = ops.meta_lstm_step(grad, loss, theta, torch.full_like(state, float("nan")), weights)
    nan_state_buffer = nan_outputs[1].data_ptr()
    del nan_outputs
    outputs = ops.meta_lstm_step(grad, loss, theta, state, weights)
    assert outputs[1].data_ptr() == nan_state_buffer
    for a, e in zip(outputs, reference.meta_lstm_step(grad, loss, theta, state, weights)):
        assert_close_to_reference(a, e)


def _recycled_state_buffers(env_mib: str) -> subprocess.CompletedProcess:
    script = textwrap.dedent("""
        import torch
        from fastmeta import ops
        state = torch.zeros(2, 2, 20, 60000, dtype=torch.float64)
        for _ in range(2):
            ops.l2o_lstm_step(torch.zeros(60000, dtype=torch.float64), state,
                              torch.zeros(ops.l2o_num_weights(2, 20), dtype=torch.float64))
        print(ops.release_recycled_buffers())
    """)
    return subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env=dict(os.environ, FASTMETA_RECYCLED_MIB=env_mib),
        timeout=300,
    )


# The state's buffer (38.4 MB) and the update's (480 kB) are kept where the limit allows.
@pytest.mark.parametrize("env_mib, kept", [("0", 0), ("30", 480000), ("40", 38880000), ("", 38880000)])
def test_recycled_buffers_honour_their_limit(env_mib, kept):
    result = _recycled_state_buffers(env_mib)
    assert result.returncode == 0, result.stderr
    assert int(result.stdout) == kept


@pytest.mark.parametrize("env_mib", ["-5", "lots", "1.5"])
def test_recycled_buffers_bad_limit_is_a_clear_error(env_mib):
    result = _recycled_state_buffers(env_mib)
    assert result.returncode != 0
    assert (
        f"FASTMETA_RECYCLED_MIB must be a whole number of MiB (0 turns recycling off), got '{env_mib}'" in result.stderr
    )


def smooth_gradients(inputs):
    """Gradients away from the preprocessing threshold and from 0, where finite
    differences of 1 / g (the second derivative of log|g|) are accurate."""
    g = torch.tensor([0.3, -0.02, 1e-7, -2e-7, 0.5, -1.1, 0.004, -0.06, 2.0], dtype=torch.float64)
    inputs[0] = g.requires_grad_()
    return inputs


def test_gradcheck_and_gradgradcheck():
    inputs = smooth_gradients(l2o_inputs(2, 3, 9, torch.float64, "cpu"))
    assert gradcheck(lambda *a: ops.l2o_lstm_step(*a, 5.0, 0.5), inputs)
    assert gradgradcheck(lambda *a: ops.l2o_lstm_step(*a, 5.0, 0.5), inputs)
    inputs = smooth_gradients(meta_inputs(3, 9, torch.float64, "cpu"))
    assert gradcheck(ops.meta_lstm_step, inputs)
    # The default eps = 1e-6 is too coarse for the reference's own second
    # derivative here; 1e-7 passes for the reference and for the op.
    assert gradgradcheck(ops.meta_lstm_step, inputs, eps=1e-7)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    fm = torch.ops.fastmeta
    grad, state, weights = l2o_inputs(2, 4, 300, torch.float32, device)
    torch.library.opcheck(fm.l2o_lstm_step, (grad, state, weights, 10.0, 0.1))
    upstream = (torch.randn_like(grad), torch.randn_like(state))
    torch.library.opcheck(
        fm.l2o_lstm_step_backward, (*upstream, grad.detach(), state.detach(), weights.detach(), 10.0, 0.1)
    )
    param = torch.randn_like(grad).detach()
    torch.library.opcheck(
        fm.l2o_lstm_step_, (param, grad.detach(), state.detach().clone(), weights.detach(), 10.0, 0.1)
    )
    meta = meta_inputs(4, 300, torch.float32, device)
    torch.library.opcheck(fm.meta_lstm_step, (*meta, 10.0))
    upstream = (torch.randn_like(meta[2]), torch.randn_like(meta[3]))
    torch.library.opcheck(fm.meta_lstm_step_backward, (*upstream, *(t.detach() for t in meta), 10.0))


def test_torch_compile():
    lstm = fastmeta.nn.CoordinatewiseLSTM()
    grad = torch.randn(300) * 1e-3
    compiled = torch.compile(lambda g: lstm(g), backend="aot_eager", fullgraph=True)
    update, state = compiled(grad)
    expected, expected_state = lstm(grad)
    torch.testing.assert_close(update, expected)
    torch.testing.assert_close(state, expected_state)


def test_weight_gradient_does_not_depend_on_thread_count():
    grad, state, weights = l2o_inputs(2, 20, 100_000, torch.float32, "cpu", requires_grad=False)
    upstream = (torch.randn_like(grad), torch.randn_like(state))
    threads = torch.get_num_threads()
    results = []
    for n in (1, 2, 3):
        torch.set_num_threads(n)
        results.append(torch.ops.fastmeta.l2o_lstm_step_backward(*upstream, grad, state, weights, 10.0, 0.1))
    torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


def test_nan_gradient_stays_in_its_coordinate():
    grad, state, weights = l2o_inputs(2, 5, 600, torch.float32, "cpu", requires_grad=False)
    grad[300] = float("nan")
    update, new_state = ops.l2o_lstm_step(grad, state, weights)
    assert torch.isnan(update[300]) and torch.isnan(new_state[..., 300]).all()
    assert torch.isfinite(update[:300]).all() and torch.isfinite(update[301:]).all()


def test_unroll_through_module_equals_lstm_cells():
    """Values and meta-gradients of a 6-step unroll on a quadratic, float64."""
    torch.manual_seed(0)
    lstm = fastmeta.nn.CoordinatewiseLSTM(hidden_size=8, num_layers=2).double()
    W, y = torch.randn(10, 10, dtype=torch.float64), torch.randn(10, dtype=torch.float64)

    def f(theta):
        return ((W @ theta - y) ** 2).sum()

    def unroll(step):
        theta, state, total = torch.zeros(10, dtype=torch.float64, requires_grad=True), None, 0
        for _ in range(6):
            loss = f(theta)
            (g,) = torch.autograd.grad(loss, theta, retain_graph=True)
            update, state = step(g.detach(), state)
            theta = theta + update
            total = total + loss
        return total + f(theta)

    def by_cells(g, state):
        if state is None:
            state = [(g.new_zeros(10, 8), g.new_zeros(10, 8)) for _ in range(2)]
        return reference.l2o_lstm_cells(lstm, g, state)

    fused = unroll(lstm)
    fused_grads = torch.autograd.grad(fused, list(lstm.parameters()))
    cells = unroll(by_cells)
    cells_grads = torch.autograd.grad(cells, list(lstm.parameters()))
    torch.testing.assert_close(fused, cells, rtol=1e-12, atol=0)
    for a, b in zip(fused_grads, cells_grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_module_keeps_shape_and_weights_are_plain_modules():
    lstm = fastmeta.nn.CoordinatewiseLSTM(hidden_size=6, num_layers=3)
    assert isinstance(lstm.cells, torch.nn.ModuleList) and len(lstm.cells) == 3
    assert all(isinstance(c, torch.nn.LSTMCell) for c in lstm.cells)
    assert lstm.cells[0].input_size == 2 and isinstance(lstm.head, torch.nn.Linear)
    grad = torch.randn(4, 5, 3) * 1e-2
    update, state = lstm(grad)
    assert update.shape == grad.shape and state.shape == (3, 2, 6, 60)
    update2, _ = lstm(grad, state)
    assert not torch.equal(update, update2)
    # Weights loaded from plain nn.LSTMCell modules give the same steps.
    other = fastmeta.nn.CoordinatewiseLSTM(hidden_size=6, num_layers=3)
    other.load_state_dict(lstm.state_dict())
    torch.testing.assert_close(other(grad)[0], update)


def test_learned_optimizer_equals_module_by_hand_and_round_trips():
    torch.manual_seed(0)
    lstm = fastmeta.nn.CoordinatewiseLSTM().double()
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1)).double()
    by_hand = copy.deepcopy(model)
    x = torch.randn(8, 4, dtype=torch.float64)
    opt = fastmeta.optim.LearnedOptimizer(model.parameters(), lstm)
    states = {}

    def backward(m):
        m.zero_grad()
        (m(x) ** 2).mean().backward()

    for _ in range(4):
        backward(model)
        opt.step()
        backward(by_hand)
        with torch.no_grad():
            for p in by_hand.parameters():
                update, states[p] = lstm(p.grad, states.get(p))
                p.add_(update)
    for a, b in zip(model.parameters(), by_hand.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)

    # A copy restored from state_dict continues exactly as the original.
    twin = copy.deepcopy(model)
    twin_opt = fastmeta.optim.LearnedOptimizer(twin.parameters(), lstm)
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    for m, o in ((model, opt), (twin, twin_opt)):
        backward(m)
        o.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)


def test_learned_optimizer_skips_params_without_grad_and_handles_non_contiguous():
    lstm = fastmeta.nn.CoordinatewiseLSTM()
    a = torch.randn(3, 4).t().requires_grad_()  # not contiguous
    b = torch.randn(5, requires_grad=True)
    before_b = b.detach().clone()
    opt = fastmeta.optim.LearnedOptimizer([a, b], lstm)
    (a**2).sum().backward()
    expected, _ = lstm(a.grad.detach())
    before_a = a.detach().clone()
    opt.step()
    torch.testing.assert_close(a.detach(), before_a + expected.detach())
    assert torch.equal(b.detach(), before_b) and b not in opt.state


def test_truncated_unrolls_yields_differentiable_meta_losses():
    torch.manual_seed(0)
    lstm = fastmeta.nn.CoordinatewiseLSTM(hidden_size=5)
    W, y = torch.randn(10, 10), torch.randn(10)
    theta0 = torch.randn(10)
    losses = list(
        fastmeta.optim.truncated_unrolls(lstm, lambda t: ((W @ t - y) ** 2).sum(), theta0, horizon=10, unroll=4)
    )
    assert len(losses) == 3  # 4 + 4 + 2 steps
    grads = torch.autograd.grad(losses[1], list(lstm.parameters()))
    assert all(torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)
    # Several tensors: each is optimized with its own slice of the one state.
    parts = list(
        fastmeta.optim.truncated_unrolls(
            lstm, lambda a, b: (a**2).sum() + (b**2).sum(), [torch.ones(2, 3), torch.ones(4)], horizon=2, unroll=2
        )
    )
    assert len(parts) == 1 and parts[0].shape == ()


def test_meta_learner_init_adapt_and_meta_gradient():
    torch.manual_seed(0)
    learner = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    meta = fastmeta.nn.MetaLearnerLSTM(learner, hidden_size=6)
    assert meta.initial_params.shape == (sum(p.numel() for p in learner.parameters()),)
    assert 4 <= meta.forget_bias.item() <= 6 and -5 <= meta.input_bias.item() <= -4
    x, y = torch.randn(10, 3), torch.randint(0, 2, (10,))
    params = meta.adapt(learner, x, y, torch.nn.functional.cross_entropy, steps=3)
    assert set(params) == {name for name, _ in learner.named_parameters()}
    loss = torch.nn.functional.cross_entropy(torch.func.functional_call(learner, params, (x,)), y)
    grads = torch.autograd.grad(loss, list(meta.parameters()))
    assert all(torch.isfinite(g).all() for g in grads)
    assert grads[-1].abs().sum() > 0  # reaches the learned initial parameters


def test_meta_learner_step_equals_reference_composition():
    learner = torch.nn.Linear(3, 2).double()
    meta = fastmeta.nn.MetaLearnerLSTM(learner, hidden_size=4).double()
    grad, theta = torch.randn(8, dtype=torch.float64) * 1e-3, meta.initial_params
    loss = torch.tensor(0.4, dtype=torch.float64)
    fused_theta, fused_state = meta(grad, loss, theta)
    ref_theta, ref_state = reference.meta_lstm_step(
        grad, loss, theta, meta.initial_state(theta), meta.flat_weights(), meta.preprocess_p
    )
    torch.testing.assert_close(fused_theta, ref_theta, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(fused_state, ref_state, rtol=1e-12, atol=1e-14)


def test_bad_input_messages():
    lstm = fastmeta.nn.CoordinatewiseLSTM(hidden_size=4)
    grad = torch.randn(10)
    _, state = lstm(grad)
    with pytest.raises(ValueError, match="state is for P = 10 coordinates but grad has P = 12"):
        lstm(torch.randn(12), state)
    with pytest.raises(TypeError, match="grad has dtype torch.float64 but the LSTM's weights are torch.float32"):
        lstm(grad.double())
    with pytest.raises(TypeError, match="gradients must be floating-point tensors, got dtype torch.int64"):
        lstm(torch.ones(3, dtype=torch.long))
    with pytest.raises(TypeError, match="state has dtype torch.float64 but grad has dtype torch.float32"):
        lstm(grad, state.double())
    with pytest.raises(ValueError, match=r"state must have shape \[num_layers, 2, hidden_size, P\]"):
        lstm(grad, state[0])
    with pytest.raises(ValueError, match="state is on meta but grad is on cpu"):
        lstm(grad, state.to("meta"))
    weights = lstm.flat_weights().detach()
    with pytest.raises(ValueError, match=r"weights must be a flat tensor of \d+ values"):
        ops.l2o_lstm_step(grad, state, weights[:-1])
    with pytest.raises(ValueError, match="param and state must be contiguous"):
        ops.l2o_lstm_step_(torch.randn(10), grad, state.transpose(0, 2).contiguous().transpose(0, 2), weights)
    with pytest.raises(TypeError, match="lstm must be a fastmeta.nn.CoordinatewiseLSTM"):
        fastmeta.optim.LearnedOptimizer([torch.zeros(1, requires_grad=True)], torch.nn.LSTMCell(2, 4))
    # The raw ops check their arguments too.
    with pytest.raises(RuntimeError, match="state has size 12 in dimension 3 but the number of coordinates P"):
        torch.ops.fastmeta.l2o_lstm_step(grad, lstm.initial_state(torch.zeros(12)), weights, 10.0, 0.1)
    with pytest.raises(RuntimeError, match="preprocess_p must be positive"):
        torch.ops.fastmeta.l2o_lstm_step(grad, state, weights, 0.0, 0.1)
    with pytest.raises(RuntimeError, match="grad must be a float32 or float64 tensor"):
        torch.ops.fastmeta.l2o_lstm_step(grad.long(), state, weights, 10.0, 0.1)
    learner = torch.nn.Linear(2, 2)
    meta = fastmeta.nn.MetaLearnerLSTM(learner, hidden_size=3)
    theta = meta.initial_params
    with pytest.raises(ValueError, match="loss must be a 0-dimensional tensor"):
        ops.meta_lstm_step(grad[:6], torch.ones(2), theta, meta.initial_state(theta), meta.flat_weights())
    with pytest.raises(ValueError, match="grad and theta must be flat"):
        ops.meta_lstm_step(grad, torch.tensor(1.0), theta, meta.initial_state(theta), meta.flat_weights())
    with pytest.raises(TypeError, match="grad must be float32 or float64, got torch.float16"):
        ops.l2o_lstm_step(grad.half(), state.half(), weights.half())
    with pytest.raises(ValueError, match="the learner has no parameters"):
        fastmeta.nn.MetaLearnerLSTM(torch.nn.ReLU())
