"""fastmeta.algorithms.iMAML against the implicit meta-gradient solved directly
from the full Hessian, on the fused (MLP) and generic (torch.func) paths."""

import pytest
import torch
from torch import nn

from fastmeta.algorithms import iMAML

DOUBLE = dict(dtype=torch.float64)


def learner(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()


def tasks(T=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(T, n, d, generator=g, **DOUBLE) for n, d in ((6, 3), (6, 2), (7, 3), (7, 2))]


def mse(out, y):
    return ((out - y) ** 2).mean()


def direct_meta_gradient(module, lr, lam, steps, x_s, y_s, x_q, y_q):
    """mean_t (I + H_t / lam)^-1 grad L_query(phi_t), H_t the full Hessian at phi_t."""
    names = [n for n, _ in module.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in module.parameters()])

    def loss_at(flat, x, y):
        params, offset = {}, 0
        for name, p in module.named_parameters():
            params[name] = flat[offset : offset + p.numel()].view_as(p)
            offset += p.numel()
        return mse(torch.func.functional_call(module, params, (x,)), y)

    grads, losses = [], []
    for t in range(x_s.shape[0]):
        phi = theta.clone()
        for _ in range(steps):
            g = torch.func.grad(loss_at)(phi, x_s[t], y_s[t])
            phi = phi - lr * (g + lam * (phi - theta))
        hessian = torch.func.hessian(loss_at)(phi, x_s[t], y_s[t])
        system = torch.eye(len(theta), **DOUBLE) + hessian / lam
        assert torch.linalg.eigvalsh(system).min() > 0  # conjugate gradient's assumption
        grads.append(torch.linalg.solve(system, torch.func.grad(loss_at)(phi, x_q[t], y_q[t])))
        losses.append(loss_at(phi, x_q[t], y_q[t]))
    assert len(names) == 4
    return torch.stack(losses).mean(), torch.stack(grads).mean(0)


# the fused MLP kernels, then the generic path recomputing and keeping graphs
PATHS = [("mse", "auto"), (mse, "recompute"), (mse, "keep")]


@pytest.mark.parametrize("loss, memory", PATHS)
@pytest.mark.parametrize("steps", [1, 5])
def test_meta_gradient_equals_the_direct_solve(loss, memory, steps):
    module = learner()
    imaml = iMAML(module, inner_lr=0.1, inner_steps=steps, lam=4.0, cg_steps=40, loss=loss, memory=memory)
    assert imaml.fused == (loss == "mse")
    data = tasks()
    value = imaml(*data)
    value.backward()
    got = torch.cat([p.grad.reshape(-1) for p in module.parameters()])
    want_value, want = direct_meta_gradient(module, 0.1, 4.0, steps, *data)
    torch.testing.assert_close(value, want_value, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10)


def test_few_cg_steps_approximate_and_more_converge():
    module = learner()
    data = tasks()
    _, want = direct_meta_gradient(module, 0.1, 4.0, 3, *data)
    errors = []
    for cg_steps in (1, 3, 40):
        module.zero_grad()
        iMAML(module, 0.1, 3, lam=4.0, cg_steps=cg_steps)(*data).backward()
        got = torch.cat([p.grad.reshape(-1) for p in module.parameters()])
        errors.append(((got - want).norm() / want.norm()).item())
    assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-9


def test_adapt_and_predict_solve_the_proximal_problem():
    module = learner()
    x_s, y_s, x_q, _ = tasks()
    imaml = iMAML(module, 0.1, 4, lam=2.0)
    adapted = imaml.adapt(x_s, y_s)
    theta = dict(module.named_parameters())
    phi = {n: p.detach().expand(3, *p.shape).clone() for n, p in theta.items()}
    for _ in range(4):
        grads = torch.func.vmap(
            lambda p, x, y: torch.func.grad(lambda q: mse(torch.func.functional_call(module, q, (x,)), y))(p)
        )(phi, x_s, y_s)
        phi = {n: phi[n] - 0.1 * (grads[n] + 2.0 * (phi[n] - theta[n].detach())) for n in phi}
    for n in phi:
        torch.testing.assert_close(adapted[n], phi[n])
    out = imaml.predict(x_s, y_s, x_q)
    want = torch.func.vmap(lambda p, x: torch.func.functional_call(module, p, (x,)))(phi, x_q)
    torch.testing.assert_close(out, want)


def test_classification_with_a_conv_learner_runs_on_the_generic_path():
    """A conv learner with batch norm: both memory policies give the same
    losses, outputs and meta-gradient (float64)."""
    results = []
    for memory in ("keep", "recompute"):
        torch.manual_seed(0)
        module = nn.Sequential(
            nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3)
        ).double()
        imaml = iMAML(module, 0.1, 3, lam=1.0, cg_steps=2, loss="cross_entropy", memory=memory)
        g = torch.Generator().manual_seed(1)
        x_s, x_q = torch.randn(2, 3, 1, 6, 6, generator=g, **DOUBLE), torch.randn(2, 6, 1, 6, 6, generator=g, **DOUBLE)
        y_s, y_q = torch.arange(3).repeat(2, 1), torch.arange(3).repeat(2, 2)
        output = imaml(x_s, y_s, x_q, y_q, return_outputs=True)
        output.loss.backward()
        assert not imaml.fused and output.loss.item() > 0
        torch.testing.assert_close(output.outputs, imaml.predict(x_s, y_s, x_q))
        results.append((output.loss, output.outputs, torch.cat([p.grad.reshape(-1) for p in module.parameters()])))
    for keep, recompute in zip(*results):
        torch.testing.assert_close(keep, recompute, rtol=1e-10, atol=1e-12)


def test_kept_graphs_without_gradients_only_solve_the_inner_problem():
    module = learner()
    data = tasks()
    imaml = iMAML(module, 0.1, 3, lam=2.0, loss=mse, memory="keep")
    with torch.no_grad():
        loss = imaml(*data)
    torch.testing.assert_close(loss, iMAML(module, 0.1, 3, lam=2.0, loss=mse, memory="recompute")(*data).detach())


def test_bad_arguments():
    with pytest.raises(ValueError, match="lam must be a number > 0, got 0"):
        iMAML(learner(), 0.1, lam=0)
    with pytest.raises(ValueError, match="lam must be a number > 0, got -1.0"):
        iMAML(learner(), 0.1, lam=-1.0)
    with pytest.raises(ValueError, match="cg_steps must be an int >= 1, got 0"):
        iMAML(learner(), 0.1, cg_steps=0)
    with pytest.raises(ValueError, match="iMAML: unknown memory policy 'none'"):
        iMAML(learner(), 0.1, memory="none")
    with pytest.raises(ValueError, match="the number of inner steps must be an int >= 0"):
        iMAML(learner(), 0.1, inner_steps=-1)
    x_s, y_s, x_q, y_q = tasks()
    with pytest.raises(ValueError, match="targets that require grad are not supported"):
        iMAML(learner(), 0.1)(x_s, y_s, x_q, y_q.requires_grad_())
    with pytest.raises(ValueError, match="the number of tasks differs"):
        iMAML(learner(), 0.1)(x_s, y_s[:2], x_q, y_q.detach())


@pytest.mark.parametrize("loss", ["mse", mse])
def test_the_plain_task_by_task_computation_agrees(loss):
    """fastmeta.reference.imaml_meta_gradient_loop, the benchmark's baseline,
    computes the same meta-gradient with the same number of CG steps."""
    from fastmeta import reference

    module = learner()
    data = tasks()
    iMAML(module, 0.1, 4, lam=3.0, cg_steps=3, loss=loss)(*data).backward()
    got = [p.grad for p in module.parameters()]
    want = reference.imaml_meta_gradient_loop(module, mse, 0.1, 4, 3.0, 3, *data)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
