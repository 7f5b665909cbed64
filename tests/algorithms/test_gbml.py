"""GBML, its gradient transforms, the Kronecker layers, LearnableOptimizer and
PrototypicalClassifier (learn2learn's interfaces) against the formulas they
implement, written out with autograd."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastmeta.algorithms import GBML, MAML, MetaSGD
from fastmeta.nn import KroneckerLinear, KroneckerLSTM, KroneckerRNN, Lambda, PrototypicalClassifier, Scale
from fastmeta.optim import DifferentiableSGD, LearnableOptimizer, ParameterUpdate
from fastmeta.optim.transforms import (
    KroneckerTransform,
    MetaCurvatureTransform,
    ModuleTransform,
    ReshapedTransform,
    TransformDictionary,
)

DOUBLE = dict(dtype=torch.float64)


def learner(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()


def task(seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(7, 3, generator=g, **DOUBLE), torch.randn(7, 2, generator=g, **DOUBLE))


def meta_gradient(wrapper, steps=2, params=None):
    x, y = task()
    clone = wrapper.clone()
    for _ in range(steps):
        clone.adapt(F.mse_loss(clone(x), y))
    return torch.autograd.grad(F.mse_loss(clone(x * 2), y), params or list(wrapper.parameters()))


@pytest.mark.parametrize("first_order", [False, True])
def test_gbml_without_transforms_is_maml(first_order):
    model = learner()
    gbml = GBML(model, transform=lambda p: None, lr=0.3, first_order=first_order)
    maml = MAML(model, lr=0.3, first_order=first_order)
    for got, want in zip(meta_gradient(gbml), meta_gradient(maml)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


def test_gbml_with_scale_transforms_is_meta_sgd():
    model = learner()
    gbml = GBML(model, transform=lambda p: Scale(p.shape), lr=1.0).double()
    with torch.no_grad():
        for alpha in gbml.compute_update.parameters():
            alpha.fill_(0.3)  # in float64: Scale's float32 0.3 is not MetaSGD's
    meta_sgd = MetaSGD(model, lr=0.3)
    got = meta_gradient(gbml, params=list(model.parameters()) + list(gbml.compute_update.parameters()))
    want = meta_gradient(meta_sgd, params=list(model.parameters()) + list(meta_sgd.lrs))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-14)


def test_gbml_adapt_transform_adapts_the_clone_transforms_from_the_second_step():
    model = learner()
    gbml = GBML(model, transform=lambda p: Scale(p.shape, alpha=0.1), lr=0.5, adapt_transform=True).double()
    x, y = task()
    clone = gbml.clone()
    clone.adapt(F.mse_loss(clone(x), y))
    scales_after_one = [p.detach().clone() for p in clone.compute_update.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(scales_after_one, gbml.compute_update.parameters()))
    loss = F.mse_loss(clone(x), y)
    # The transforms' step: by the gradient of this loss w.r.t. them, before the module's step.
    scale_grads = torch.autograd.grad(loss, list(clone.compute_update.parameters()), retain_graph=True)
    clone.adapt(loss)
    for p, before, g in zip(clone.compute_update.parameters(), scales_after_one, scale_grads):
        torch.testing.assert_close(p, before - 0.5 * g)
    F.mse_loss(clone(x), y).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in gbml.compute_update.parameters())


def test_gbml_unused_and_frozen_parameters():
    model = learner()
    model[2].weight.requires_grad_(False)
    clone = GBML(model, transform=lambda p: None, lr=0.1).clone()
    x, y = task()
    with pytest.raises(RuntimeError, match="pass allow_nograd=True"):
        clone.adapt(F.mse_loss(clone(x), y))
    before = model[2].weight.clone()
    clone.adapt(F.mse_loss(clone(x), y), allow_nograd=True)
    assert torch.equal(clone.module[2].weight, before)
    unused = GBML(learner(), transform=lambda p: None, lr=0.1, allow_unused=True).clone()
    unused.adapt(unused.module[0].weight.sum())
    with pytest.raises(RuntimeError, match="allow_unused=True"):
        GBML(learner(), transform=lambda p: None).clone().adapt(
            learner()[0].weight.sum() * 0 + unused.module[0].weight.sum()
        )


def test_module_transform_is_a_linear_map_of_the_flat_gradient():
    weight = torch.randn(3, 4)
    transform = ModuleTransform(nn.Linear)(weight)
    grad = torch.randn(3, 4)
    linear = transform.transform
    torch.testing.assert_close(transform(grad), (linear.weight @ grad.flatten() + linear.bias).view(3, 4))


def test_meta_curvature_is_a_product_along_each_mode():
    torch.manual_seed(0)
    for shape in [(4,), (3, 5), (6, 2, 3, 3)]:
        param = torch.randn(shape)
        transform = MetaCurvatureTransform(param, lr=0.5)
        grad = torch.randn(shape)
        torch.testing.assert_close(transform(grad), 0.5 * grad)  # the identity at first
        with torch.no_grad():
            for p in transform.parameters():
                p.add_(torch.randn_like(p))
        if len(shape) == 1:
            want = transform.mc * grad
        elif len(shape) == 2:
            want = transform.mc_in @ grad @ transform.mc_out
        else:
            # mode products, one mode at a time: out channels, in channels, kernel positions
            g = grad.flatten(2)
            g = torch.tensordot(transform.mc_in, g, dims=([1], [0]))
            g = torch.tensordot(g, transform.mc_out, dims=([1], [0])).permute(0, 2, 1)
            g = torch.tensordot(g, transform.mc_f, dims=([2], [1]))
            want = g.reshape(shape)
        torch.testing.assert_close(transform(grad), 0.5 * want)
    with pytest.raises(ValueError, match="1, 2 or 4 dimensions"):
        MetaCurvatureTransform(torch.randn(2, 2, 2))


def test_kronecker_linear_is_a_kronecker_product_on_vec():
    torch.manual_seed(0)
    n, m = 3, 4
    layer = KroneckerLinear(n, m, bias=True).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(torch.randn_like(p))
    x = torch.randn(n * m, **DOUBLE)

    def vec(a):  # column-major
        return a.T.flatten()

    matrix = torch.kron(layer.right.T.contiguous(), layer.left)
    torch.testing.assert_close(layer(x), matrix @ x + vec(layer.bias))
    X = x.reshape(m, n).T
    torch.testing.assert_close(
        layer(X[None].expand(2, n, m)), (layer.left @ X @ layer.right + layer.bias).expand(2, n, m)
    )
    psd = KroneckerLinear(n, m, bias=False, psd=True).double()
    with torch.no_grad():
        psd.left.mul_(2)
    torch.testing.assert_close(psd(X), 4 * X)
    with pytest.raises(ValueError, match="inputs must end in \\(3, 4\\)"):
        layer(torch.randn(4, 3, **DOUBLE))
    with pytest.raises(ValueError, match="n \\* m = 12 elements, got 5"):
        layer(torch.randn(5, **DOUBLE))


def test_kronecker_transform_preconditions_each_matrix_of_the_gradient():
    for shape, (n, m) in [((5, 3), (5, 3)), ((4,), (4, 1)), ((6, 2, 3, 3), (2, 9))]:
        transform = KroneckerTransform(KroneckerLinear, psd=False)(torch.randn(shape))
        inner = transform.transform
        with torch.no_grad():
            inner.left.add_(torch.randn(n, n))
            inner.right.add_(torch.randn(m, m))
        grad = torch.randn(shape)
        torch.testing.assert_close(transform(grad), (inner.left @ grad.reshape(-1, n, m) @ inner.right).reshape(shape))


def test_kronecker_recurrent_cells_run():
    rnn, lstm = KroneckerRNN(2, 3), KroneckerLSTM(2, 3)
    x, h = torch.randn(2, 3), torch.zeros(2, 3)
    output, hidden = rnn(x, h)
    torch.testing.assert_close(hidden, torch.tanh(x))  # identity factors, zero biases
    h, (h2, c) = lstm(x, (h, h))
    assert h.shape == c.shape == (2, 3) and torch.equal(h, h2)


def test_transform_dictionary_and_parameter_update():
    model = learner()
    transform = TransformDictionary({model[0]: lambda p: Scale(p.shape, 2.0)})
    update = ParameterUpdate(model.parameters(), transform).double()
    assert update.transforms_indices == [0, 1, None, None]
    x, y = task()
    loss = F.mse_loss(model(x), y)
    grads = torch.autograd.grad(loss, list(model.parameters()), retain_graph=True)
    got = update(loss, model.parameters())
    for g, u, factor in zip(grads, got, [2, 2, 1, 1]):
        torch.testing.assert_close(u, factor * g)
    with pytest.raises(ValueError, match="keys are modules or parameters"):
        TransformDictionary({"layer": None})
    with pytest.raises(ValueError, match="returns a Module or None"):
        ParameterUpdate(model.parameters(), lambda p: 2.0)
    assert isinstance(ReshapedTransform(nn.Identity(), (-1,))(torch.ones(2, 2)), torch.Tensor)


def test_differentiable_sgd_updates_in_place_with_the_graph():
    model = learner()
    x, y = task()
    grads = torch.autograd.grad(F.mse_loss(model(x), y), list(model.parameters()), create_graph=True)
    weights = [p for p in model.parameters()]
    DifferentiableSGD(0.1)(model, grads)
    for new, old, g in zip(model.parameters(), weights, grads):
        torch.testing.assert_close(new, old - 0.1 * g)
        assert new.grad_fn is not None


def test_learnable_optimizer_steps_by_the_transform_and_trains_it():
    torch.manual_seed(0)
    model = nn.Linear(3, 1).double()
    optimizer = LearnableOptimizer(model, lambda p: Scale(p.shape, 0.5), lr=0.2).double()
    x, y = task()
    y = y[:, :1]
    F.mse_loss(model(x), y).backward()
    before = [p.detach().clone() for p in model.parameters()]
    grads = [p.grad.clone() for p in model.parameters()]
    optimizer.step()
    for p, b, g in zip(model.parameters(), before, grads):
        torch.testing.assert_close(p, b - 0.2 * 0.5 * g)
    optimizer.zero_grad()
    F.mse_loss(model(x), y).backward()
    # d loss / d scale = -lr * g_before * d loss / d p_new
    for scale, g, p in zip(optimizer.parameters(), grads, model.parameters()):
        torch.testing.assert_close(scale.grad, -0.2 * g * p.grad)
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        LearnableOptimizer(torch.zeros(2), lambda p: None)


def test_prototypical_classifier():
    g = torch.Generator().manual_seed(0)
    support, queries = torch.randn(9, 4, generator=g, **DOUBLE), torch.randn(5, 4, generator=g, **DOUBLE)
    labels = torch.tensor([7, 3, 7, 5, 3, 5, 5, 7, 3])  # classes ordered 3, 5, 7
    means = torch.stack([support[labels == c].mean(0) for c in (3, 5, 7)])
    classifier = PrototypicalClassifier(support, labels)
    torch.testing.assert_close(classifier(queries), -(torch.cdist(queries, means) ** 2))
    cosine = PrototypicalClassifier(support, labels, distance="cosine")
    torch.testing.assert_close(cosine(queries), F.normalize(queries, dim=1) @ F.normalize(means, dim=1).T)
    custom = PrototypicalClassifier(support, labels, distance=lambda p, x: torch.cdist(x, p))
    torch.testing.assert_close(custom(queries), -torch.cdist(queries, means))
    with pytest.raises(RuntimeError, match="call fit_"):
        PrototypicalClassifier()(queries)
    with pytest.raises(ValueError, match="distance must be"):
        PrototypicalClassifier(distance="manhattan")
    assert Lambda(torch.neg)(torch.ones(2)).tolist() == [-1.0, -1.0]
    assert Scale(3, alpha=2.0)(torch.ones(3)).tolist() == [2.0, 2.0, 2.0]


def test_detach_module_cuts_the_graph_in_place():
    import fastmeta

    model = learner()
    clone = fastmeta.clone_module(model)
    x, y = task()
    grads = torch.autograd.grad(F.mse_loss(clone(x), y), list(clone.parameters()), create_graph=True)
    fastmeta.update_module(clone, [-0.1 * g for g in grads])
    assert all(p.grad_fn is not None for p in clone.parameters())
    fastmeta.detach_module(clone, keep_requires_grad=True)
    assert all(p.grad_fn is None and p.requires_grad for p in clone.parameters())
    F.mse_loss(clone(x), y).backward()
    assert all(p.grad is None for p in model.parameters())  # nothing reaches the original
    fastmeta.detach_module(clone)
    assert not any(p.requires_grad for p in clone.parameters())


def test_parameter_transform_runs_the_module_on_transformed_parameters():
    from fastmeta.nn import ParameterTransform

    torch.manual_seed(0)
    inner = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    wrapped = ParameterTransform(inner, lambda p: Scale(p.shape, alpha=2.0))
    x = torch.randn(5, 3)
    want = F.linear(
        torch.tanh(F.linear(x, 2 * inner[0].weight, 2 * inner[0].bias)), 2 * inner[2].weight, 2 * inner[2].bias
    )
    out = wrapped(x)
    torch.testing.assert_close(out, want)
    assert isinstance(inner[0].weight, nn.Parameter)  # the module's own parameters are back
    out.sum().backward()
    assert len(list(wrapped.meta_parameters())) == 4 and all(p.grad is not None for p in wrapped.meta_parameters())


def test_meta_module_substitutes_freezes_and_unwraps():
    from fastmeta.nn import MetaModule, ParameterTransform

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Sequential(nn.Linear(4, 2)))
    originals = list(model.parameters())
    wrapped = MetaModule(model, {nn.Linear: lambda layer: ParameterTransform(layer, lambda p: Scale(p.shape))})
    assert not any(p.requires_grad for p in originals)
    assert isinstance(wrapped.wrapped_module[0], ParameterTransform) and isinstance(
        wrapped.wrapped_module[2][0], ParameterTransform
    )
    assert len(list(wrapped.meta_parameters())) == 4
    x = torch.randn(5, 3)
    torch.testing.assert_close(wrapped(x), nn.Sequential(model[0].module, nn.ReLU(), model[2][0].module)(x))
    doubled = MetaModule(
        nn.Sequential(nn.Linear(3, 3)),
        {nn.Linear: lambda layer: nn.Sequential(layer, nn.Linear(3, 3))},
        freeze_module=False,
    )
    assert isinstance(doubled.wrapped_module[0], nn.Sequential) and doubled.wrapped_module[0][0].weight.requires_grad
    unwrapped = wrapped.module()
    assert isinstance(unwrapped[0], nn.Linear) and isinstance(unwrapped[2][0], nn.Linear)
