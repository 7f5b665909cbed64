"""fastmeta.ops.gnn_adjacency and fastmeta.nn.FewShotGNN against their eager
formulations."""

import importlib

import pytest
import torch

from fastmeta import nn as fnn
from fastmeta import ops, reference
from fastmeta.testing import DEVICES, compare_with_reference

gnn_adjacency_module = importlib.import_module("fastmeta.ops.gnn_adjacency")


def operands(B, n, F, hidden, dtype=torch.float64, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    widths = [F, *hidden, 1]
    nodes = torch.randn(B, n, F, generator=g, dtype=torch.float64)
    weights = [
        torch.randn(b, a, generator=g, dtype=torch.float64) / max(a, 1) ** 0.5 for a, b in zip(widths[:-1], widths[1:])
    ]
    biases = [torch.randn(b, generator=g, dtype=torch.float64) * 0.1 for b in widths[1:]]
    move = lambda ts: [t.to(device, dtype).requires_grad_() for t in ts]  # noqa: E731
    return move([nodes])[0], move(weights), move(biases)


# (B, n, F, hidden widths): odd sizes, one node, two nodes, one layer, a tile
# boundary (128 pairs), B = 0, n = 0, the paper's widths
SHAPES = [
    (2, 6, 5, [7, 3]),
    (3, 1, 4, [2]),
    (2, 2, 3, []),
    (2, 17, 9, [11, 6, 5]),
    (1, 17, 3, [4]),
    (0, 4, 3, [2]),
    (2, 0, 3, [2]),
    (2, 21, 69, [138, 138, 69, 69]),
    (5, 3, 1, [1, 1]),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("B, n, F, hidden", SHAPES)
@pytest.mark.parametrize("kept", [True, False], ids=["kept", "recomputed"])
@pytest.mark.parametrize("last_row", [False, True], ids=["all-rows", "last-row"])
def test_matches_reference_values_and_gradients(device, dtype, B, n, F, hidden, kept, last_row, monkeypatch):
    if not kept:  # the backward recomputes the hidden activations
        monkeypatch.setattr(gnn_adjacency_module, "KEPT_HIDDEN_VALUES", -1)
    nodes, weights, biases = operands(B, n, F, hidden, dtype, device)
    (out,), _ = compare_with_reference(
        lambda *t: ops.gnn_adjacency(*t, negative_slope=0.1, last_row=last_row),
        lambda *t: reference.gnn_adjacency(*t, 0.1, last_row),
        (nodes, weights, biases),
    )
    assert out.shape == (B, n, n) and out.dtype == dtype
    if n > 1:
        sums = torch.ones(B, n, dtype=dtype, device=device)
        if last_row:
            sums[:, :-1] = 0
        torch.testing.assert_close(out.sum(-1), sums)
    assert (out.diagonal(dim1=1, dim2=2) == 0).all()


def test_hidden_activations_kept_only_for_a_backward_and_within_the_limit(monkeypatch):
    nodes, weights, biases = operands(2, 6, 5, [7, 3])
    asked = []
    raw = torch.ops.fastmeta.gnn_adjacency

    class Spy:
        def __call__(self, *args):
            asked.append(args[-1])
            return raw(*args)

    monkeypatch.setattr(torch.ops.fastmeta, "gnn_adjacency", Spy())
    out = ops.gnn_adjacency(nodes, weights, biases)
    with torch.no_grad():
        ops.gnn_adjacency(nodes, weights, biases)
    ops.gnn_adjacency(nodes.detach(), [w.detach() for w in weights], [b.detach() for b in biases])
    monkeypatch.setattr(gnn_adjacency_module, "KEPT_HIDDEN_VALUES", 2 * 15 * 10 - 1)
    ops.gnn_adjacency(nodes, weights, biases)
    assert asked == [True, False, False, False]
    # what it kept: 2 episodes x 15 pairs x (7 + 3) hidden values, layer after layer
    adjacency, hidden = raw(
        nodes.detach(), [w.detach() for w in weights], [b.detach() for b in biases], 0.01, False, True
    )
    assert hidden.shape == (300,)
    torch.testing.assert_close(adjacency, out.detach())
    i, j = torch.triu_indices(6, 6, 1)
    first = torch.nn.functional.leaky_relu(
        (nodes[:, i] - nodes[:, j]).abs().detach().flatten(0, 1) @ weights[0].detach().T + biases[0].detach(), 0.01
    )
    torch.testing.assert_close(hidden[: 30 * 7].view(30, 7), first)


def test_equal_nodes_and_ties_follow_abs_gradient_zero():
    nodes, weights, biases = operands(1, 4, 3, [5])
    with torch.no_grad():
        nodes[0, 2] = nodes[0, 1]
    out = ops.gnn_adjacency(nodes, weights, biases)
    expected = reference.gnn_adjacency(nodes, weights, biases)
    torch.testing.assert_close(out, expected)
    for a, b in zip(
        torch.autograd.grad(out[0, 0, 1] + out[0, 2, 3], nodes),
        torch.autograd.grad(expected[0, 0, 1] + expected[0, 2, 3], nodes),
    ):
        torch.testing.assert_close(a, b)


def test_nan_stays_in_its_episode():
    nodes, weights, biases = [
        t.detach() if isinstance(t, torch.Tensor) else [w.detach() for w in t] for t in operands(3, 5, 4, [6])
    ]
    nodes[1, 2, 0] = float("nan")
    out = ops.gnn_adjacency(nodes, weights, biases)
    assert out[1].isnan().any() and out[[0, 2]].isfinite().all()


@pytest.mark.parametrize("last_row", [False, True])
def test_gradcheck_and_gradgradcheck(last_row):
    nodes, weights, biases = operands(2, 5, 3, [4, 3])

    def fn(nodes, *layers):
        return ops.gnn_adjacency(nodes, layers[:3], layers[3:], 0.2, last_row)

    assert torch.autograd.gradcheck(fn, (nodes, *weights, *biases))
    assert torch.autograd.gradgradcheck(fn, (nodes, *weights, *biases))


@pytest.mark.parametrize("last_row", [False, True])
def test_under_torch_func_grad_vjp_and_jacrev(last_row):
    nodes, weights, biases = [
        t.detach() if isinstance(t, torch.Tensor) else [w.detach() for w in t] for t in operands(2, 5, 3, [4, 2])
    ]

    def adjacency(function):
        return lambda x, w: function(x, [w, *weights[1:]], biases, 0.1, last_row)

    fn, ref = adjacency(ops.gnn_adjacency), adjacency(reference.gnn_adjacency)
    args = (nodes, weights[0])
    for name, transform in [
        ("grad", lambda f: torch.func.grad(lambda *a: f(*a).pow(2).sum(), (0, 1))),
        ("jacrev", lambda f: torch.func.jacrev(f, (0, 1))),
    ]:
        for got, want in zip(transform(fn)(*args), transform(ref)(*args)):
            torch.testing.assert_close(got, want, msg=name)
    cotangent = torch.randn(2, 5, 5, dtype=torch.float64)
    for got, want in zip(torch.func.vjp(fn, *args)[1](cotangent), torch.func.vjp(ref, *args)[1](cotangent)):
        torch.testing.assert_close(got, want)
    with pytest.raises(
        RuntimeError,
        match="second derivatives under torch.func's transforms are not "
        r"supported; take them with torch.autograd.grad",
    ):
        torch.func.grad(lambda x: torch.func.grad(lambda y: fn(y, weights[0]).pow(2).sum())(x).sum())(nodes)


@pytest.mark.parametrize("last_row", [False, True])
def test_torch_compile_fullgraph(last_row):
    nodes, weights, biases = operands(2, 5, 3, [4, 2])
    leaves = [nodes, *weights, *biases]

    def loss(function):
        return function(nodes, weights, biases, 0.1, last_row).pow(2).sum()

    got = torch.compile(lambda: loss(ops.gnn_adjacency), fullgraph=True, backend="aot_eager")()
    want = loss(reference.gnn_adjacency)
    torch.testing.assert_close(got, want)
    for a, b in zip(torch.autograd.grad(got, leaves), torch.autograd.grad(want, leaves)):
        torch.testing.assert_close(a, b)


def test_opcheck():
    for shape in ((2, 5, 3, [4, 3]), (1, 1, 2, [2]), (0, 3, 2, [])):
        nodes, weights, biases = operands(*shape)
        for last_row in (False, True):
            for keep_hidden in (False, True):
                torch.library.opcheck(
                    torch.ops.fastmeta.gnn_adjacency, (nodes, weights, biases, 0.01, last_row, keep_hidden)
                )


def test_bad_input_messages():
    nodes, weights, biases = operands(2, 5, 3, [4])
    with pytest.raises(ValueError, match=r"nodes must be \[B, n, F\], got shape \[5, 3\]"):
        ops.gnn_adjacency(nodes[0], weights, biases)
    with pytest.raises(
        ValueError,
        match=r"weights\[0\] must be \[H, 2\] and biases\[0\] \[H\] "
        r"\(layer 0 takes 2 features\), got \[4, 3\] and \[4\]",
    ):
        ops.gnn_adjacency(nodes[..., :2], weights, biases)
    with pytest.raises(
        ValueError,
        match=r"the last layer must have one output, got weights\[-1\] "
        r"of shape \[4, 3\]",
    ):
        ops.gnn_adjacency(nodes, weights[:1], biases[:1])
    with pytest.raises(ValueError, match="got 2 weights and 1 biases"):
        ops.gnn_adjacency(nodes, weights, biases[:1])
    with pytest.raises(ValueError, match="negative_slope must be >= 0, got -0.5"):
        ops.gnn_adjacency(nodes, weights, biases, -0.5)
    with pytest.raises(
        TypeError,
        match=r"weights\[1\] has dtype torch.float32 but nodes has dtype "
        "torch.float64",
    ):
        ops.gnn_adjacency(nodes, [weights[0], weights[1].float()], biases)
    with pytest.raises(
        RuntimeError,
        match=r"weights\[0\] must have 2 columns \(the previous "
        r"layer's width\), got shape \[4, 3\]",
    ):
        torch.ops.fastmeta.gnn_adjacency(
            nodes.detach()[..., :2].contiguous(),
            [w.detach() for w in weights],
            [b.detach() for b in biases],
            0.01,
            False,
            False,
        )

    def backward(grad, hidden):
        return torch.ops.fastmeta.gnn_adjacency_backward(
            grad,
            torch.zeros(2, 5, 5, dtype=torch.float64),
            hidden,
            nodes.detach(),
            [w.detach() for w in weights],
            [b.detach() for b in biases],
            0.01,
            False,
        )

    with pytest.raises(RuntimeError, match=r"grad must have shape \[B, n, n\] = \[2, 5, 5\]"):
        backward(torch.zeros(2, 5, 4, dtype=torch.float64), torch.zeros(0, dtype=torch.float64))
    # 2 episodes x 10 unordered pairs x 4 hidden values
    with pytest.raises(
        RuntimeError,
        match=r"hidden must be empty or hold the 80 kept hidden "
        r"activations, got shape \[79\]",
    ):
        backward(torch.zeros(2, 5, 5, dtype=torch.float64), torch.zeros(79, dtype=torch.float64))


def gnn(dtype=torch.float64, ways=5, **kwargs):
    torch.manual_seed(0)
    return fnn.FewShotGNN(feature_dimension=8, ways=ways, hidden=6, **kwargs).to(dtype)


def episode(B=2, ways=5, shots=2, queries=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    support = torch.randn(B, ways * shots, 8, generator=g, dtype=torch.float64)
    labels = torch.arange(ways).repeat_interleave(shots).expand(B, -1)
    query = torch.randn(B, queries, 8, generator=g, dtype=torch.float64)
    return support, labels, query, torch.randint(0, ways, (B, queries), generator=g)


@pytest.mark.parametrize("layers, ways, shots", [(0, 5, 2), (2, 5, 2), (2, 1, 1), (1, 3, 1)])
def test_gnn_equals_its_eager_formulation(layers, ways, shots):
    model = gnn(layers=layers, ways=ways)
    support, labels, query, query_labels = episode(ways=ways, shots=shots)
    scores = model.score_episodes(support, labels, query)
    graphs = model.query_graphs(model.prepare_support(support, labels, ways), query)
    assert graphs.shape == (6, ways * shots + 1, 8 + ways)
    torch.testing.assert_close(graphs[:, -1, 8:], torch.full((6, ways), 1 / ways, dtype=torch.float64))
    expected = reference.gnn_logits(model, graphs).view(2, 3, ways)
    torch.testing.assert_close(scores, expected)
    params = list(model.parameters())
    loss = torch.nn.functional.cross_entropy(expected.flatten(0, 1), query_labels.flatten())
    for a, b in zip(
        torch.autograd.grad(model.loss(support, labels, query, query_labels), params), torch.autograd.grad(loss, params)
    ):
        torch.testing.assert_close(a, b)


def test_gnn_queries_do_not_see_each_other_and_easyfsl_interface():
    model = gnn().eval()
    support, labels, query, _ = episode(B=1)
    together = model.score_episodes(support, labels, query)
    alone = model.score_episodes(support, labels, query[:, :1])
    torch.testing.assert_close(together[:, :1], alone)
    model.process_support_set(support[0], labels[0])
    torch.testing.assert_close(model(query[0]), together[0])


def test_gnn_bad_input_messages():
    model = gnn()
    support, labels, query, _ = episode(ways=4)
    with pytest.raises(ValueError, match="built for ways = 5, got episodes of 4 classes"):
        model.score_episodes(support, labels, query)
    support, labels, query, _ = episode()
    with pytest.raises(ValueError, match="the backbone gives 7 features, but feature_dimension is 8"):
        model.score_episodes(support[..., :7], labels, query[..., :7])
    with pytest.raises(ValueError, match=r"support_labels must lie in 0..4"):
        model.score_episodes(support, labels + 1, query, ways=5)
    with pytest.raises(ValueError, match="query has 1 episodes, support 2"):
        model.score_episodes(support, labels, query[:1])
    with pytest.raises(ValueError, match="hidden must be an integer >= 2, got 1"):
        fnn.FewShotGNN(feature_dimension=8, hidden=1)
