"""gradcheck / gradgradcheck in float64, torch.library.opcheck, torch.compile and vmap."""

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

from fastmeta import ops, reference
from fastmeta.testing import DEVICES, randn

METRICS = ["sqeuclidean", "euclidean", "cosine", "dot"]


def inputs(device, B=2, Q=4, N=6, D=3):
    x = randn(B, Q, D, dtype=torch.float64, device=device, requires_grad=True)
    y = randn(B, N, D, dtype=torch.float64, device=device, requires_grad=True)
    scale = (0.5 + torch.rand(B, Q, dtype=torch.float64, device=device)).requires_grad_()
    target = torch.randint(0, N, (B, Q), device=device)
    values = randn(B, N, 5, dtype=torch.float64, device=device, requires_grad=True)
    return x, y, scale, target, values


def functions(device, metric):
    """Each public op as a function of its differentiable inputs."""
    x, y, scale, target, values = inputs(device)
    support = randn(2, 7, 3, dtype=torch.float64, device=device, requires_grad=True)
    labels = torch.tensor([[0, 1, 2, 0, 1, 2, 2], [2, 2, 1, 0, 0, 1, 1]], device=device)
    same = torch.rand(2, 4, dtype=torch.float64, device=device).round().requires_grad_()
    fns = {
        "similarity_log_softmax": (lambda x, y, s: ops.similarity_log_softmax(x, y, metric, s), (x, y, scale)),
        "similarity_cross_entropy": (
            lambda x, y, s: ops.similarity_cross_entropy(x, y, target, metric, s, "none"),
            (x, y, scale),
        ),
        # A reduced loss with gradients takes the fused op on the CPU: few keys, and many.
        "similarity_cross_entropy (fused)": (
            lambda x, y, s: ops.similarity_cross_entropy(x, y, target, metric, s),
            (x, y, scale),
        ),
        "similarity_cross_entropy (fused, many keys)": (
            lambda x, y, s: ops.similarity_cross_entropy(x, y.repeat(1, 43, 1), target, metric, s),
            (x, y, scale),
        ),
        "attention_readout": (lambda x, y, v, s: ops.attention_readout(x, y, v, metric, s), (x, y, values, scale)),
        "class_prototypes": (lambda s: ops.class_prototypes(s, labels, 3), (support,)),
        "contrastive_loss": (
            lambda a, b, s: ops.contrastive_loss(a, b, s, 1.5, "none"),
            (x, x.detach().flip(0).requires_grad_(), same),
        ),
    }
    if metric != "dot":
        fns["pairwise_distance"] = (lambda x, y: ops.pairwise_distance(x, y, metric), (x, y))
    return fns


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("metric", METRICS)
def test_gradcheck_and_gradgradcheck(device, metric):
    for name, (fn, args) in functions(device, metric).items():
        assert gradcheck(fn, args), name
        # Twice differentiable: promised for similarity_log_softmax and
        # similarity_cross_entropy, and holds for every op.
        assert gradgradcheck(fn, args), name


@pytest.mark.parametrize("device", DEVICES)
def test_second_order_maml_step_through_cross_entropy_matches_reference(device):
    # One inner SGD step on a linear embedding, then the query loss: the
    # meta-gradient needs the derivative of the inner gradient.
    W = randn(3, 4, dtype=torch.float64, device=device, requires_grad=True)
    xs, xq = randn(10, 3, dtype=torch.float64, device=device), randn(6, 3, dtype=torch.float64, device=device)
    protos = randn(5, 4, dtype=torch.float64, device=device)
    ts, tq = torch.randint(0, 5, (10,), device=device), torch.randint(0, 5, (6,), device=device)

    def meta_gradient(loss_fn):
        inner = loss_fn(xs @ W, protos, ts)
        (g,) = torch.autograd.grad(inner, W, create_graph=True)
        return torch.autograd.grad(loss_fn(xq @ (W - 0.1 * g), protos, tq), W)[0]

    fast = meta_gradient(lambda a, b, t: ops.similarity_cross_entropy(a, b, t, "sqeuclidean", 0.5))
    slow = meta_gradient(lambda a, b, t: reference.similarity_cross_entropy(a, b, t, "sqeuclidean", 0.5))
    torch.testing.assert_close(fast, slow, rtol=1e-10, atol=1e-10)


def opcheck_samples(device, dtype):
    x = randn(2, 5, 3, dtype=dtype, device=device, requires_grad=True)
    y = randn(2, 7, 3, dtype=dtype, device=device, requires_grad=True)
    scale = (0.5 + torch.rand(2, 5, dtype=dtype, device=device)).requires_grad_()
    target = torch.randint(0, 7, (2, 5), device=device)
    values = randn(2, 7, 4, dtype=dtype, device=device, requires_grad=True)
    support = randn(2, 6, 3, dtype=dtype, device=device, requires_grad=True)
    labels = torch.tensor([[0, 1, 2, 0, 1, 2], [2, 1, 0, 0, 1, 2]], device=device)
    same = (torch.rand(5, device=device) > 0.5).to(dtype).requires_grad_()
    fm = torch.ops.fastmeta
    samples = []
    for metric in METRICS:
        if metric != "dot":
            samples.append((fm.pairwise_distance, (x, y, metric)))
        samples += [
            (fm.similarity_log_softmax, (x, y, scale, metric)),
            (fm.similarity_cross_entropy, (x, y, target, scale, metric)),
            (fm.similarity_cross_entropy_with_grad, (x, y, target, scale, metric, 0.1)),
            (fm.attention_readout, (x, y, values, scale, metric)),
        ]
    samples += [
        (fm.class_prototypes, (support, labels, 3)),
        (fm.contrastive_loss, (x[0], y[0, :5], same, 1.0)),
    ]
    return samples


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck(device, dtype):
    for op, args in opcheck_samples(device, dtype):
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_backward_ops(device):
    x, y, scale, target, values = inputs(device)
    fm = torch.ops.fastmeta
    with torch.no_grad():
        loss, lse = fm.similarity_cross_entropy(x, y, target, scale, "cosine")
        log_probs = fm.similarity_log_softmax(x, y, scale, "cosine")
        out, out_lse = fm.attention_readout(x, y, values, scale, "cosine")
        distance = fm.pairwise_distance(x, y, "cosine")
    cases = [
        (fm.similarity_cross_entropy_backward, (torch.rand_like(loss), x, y, target, scale, lse, "cosine")),
        (fm.similarity_log_softmax_backward, (torch.rand_like(log_probs), log_probs, x, y, scale, "cosine")),
        (fm.attention_readout_backward, (torch.rand_like(out), out, out_lse, x, y, values, scale, "cosine")),
        (fm.pairwise_distance_backward, (torch.rand_like(distance), distance, x, y, "cosine")),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(device, backend):
    x, y, scale, target, values = inputs(device)
    support = randn(2, 6, 3, dtype=torch.float64, device=device, requires_grad=True)
    labels = torch.tensor([[0, 1, 2, 0, 1, 2], [2, 1, 0, 0, 1, 2]], device=device)

    def episode(support, x, y, scale, values):
        protos = ops.class_prototypes(support, labels, 3)
        loss = ops.similarity_cross_entropy(x, protos, target % 3, "sqeuclidean", scale)
        loss = loss + ops.similarity_log_softmax(x, y, "cosine", scale).mean()
        loss = loss + ops.attention_readout(x, y, values, "dot", 2.0).sum()
        loss = loss + ops.pairwise_distance(x, y, "euclidean").mean()
        return loss + ops.contrastive_loss(x[0], x[1], torch.ones(4, dtype=x.dtype, device=device))

    args = (support, x, y, scale, values)
    compiled = torch.compile(episode, fullgraph=True, backend=backend)
    expected = episode(*args)
    got = compiled(*args)
    torch.testing.assert_close(got, expected)
    for g, e in zip(torch.autograd.grad(got, args), torch.autograd.grad(expected, args)):
        torch.testing.assert_close(g, e)


def every_op_cases(n):
    """Each op on inputs whose sizes follow ``n``: (name, function of the
    ops module and the inputs, inputs)."""
    g = torch.Generator().manual_seed(n)

    def r(*shape, scale=1.0, grad=True):
        return (scale * torch.randn(*shape, generator=g, dtype=torch.float64)).requires_grad_(grad)

    x, y, values = r(2, n, 3), r(2, n + 1, 3), r(2, n + 1, 4)
    scale = 1 + torch.rand(2, n, generator=g, dtype=torch.float64)
    target = torch.randint(0, n + 1, (2, n), generator=g)
    labels = (torch.arange(2 * n) % n).expand(2, -1)
    H = 3
    cases = [
        ("pairwise_distance", lambda f, x, y: f.pairwise_distance(x, y, "euclidean"), (x, y)),
        ("similarity_log_softmax", lambda f, x, y, s: f.similarity_log_softmax(x, y, "cosine", s), (x, y, scale)),
        ("attention_readout", lambda f, x, y, v: f.attention_readout(x, y, v, "dot", 2.0), (x, y, values)),
        (
            "class_prototypes",
            lambda f, s, labels: f.class_prototypes(s, labels, labels.shape[1] // 2),
            (r(2, 2 * n, 3), labels),
        ),
        (
            "contrastive_loss",
            lambda f, a, b, same: f.contrastive_loss(a, b, same),
            (r(n, 3), r(n, 3), (torch.arange(n) % 2).double()),
        ),
        ("relation_pair_pool", lambda f, q, p: f.relation_pair_pool(q, p), (r(1, n, 3, 3, 2), r(1, 2, 3, 3, 2))),
        (
            "matching_attention_lstm",
            lambda f, *t: f.matching_attention_lstm(*t, steps=2),
            (r(2, n, 3), r(2, 4, 3), r(12, 6, scale=0.5), r(12, 3, scale=0.5), r(12)),
        ),
        (
            "mann_memory",
            lambda f, *t: f.mann_memory(*t),
            (
                r(2, 5, 3),
                torch.zeros(2, 5, dtype=torch.float64),
                torch.full((2, 1, 5), 0.2, dtype=torch.float64),
                r(2, n, 1, 3),
                torch.full((2, n, 1), 0.5, dtype=torch.float64),
            ),
        ),
        (
            "gnn_adjacency",
            lambda f, nodes, w1, w2, b1, b2: f.gnn_adjacency(nodes, [w1, w2], [b1, b2], 0.1),
            (r(2, n, 3), r(4, 3), r(1, 4), r(4), r(1)),
        ),
        (
            "l2o_lstm_step",
            lambda f, *t: f.l2o_lstm_step(*t),
            (r(n, scale=1e-2), r(1, 2, H, n, scale=0.5), r(ops.l2o_num_weights(1, H), scale=0.3)),
        ),
        (
            "meta_lstm_step",
            lambda f, *t: f.meta_lstm_step(*t),
            (
                r(n, scale=1e-2),
                torch.tensor(0.7, dtype=torch.float64),
                r(n),
                r(2 * H + 2, n, scale=0.5),
                r(ops.meta_lstm_num_weights(H), scale=0.3),
            ),
        ),
        (
            "mlp_task_derivatives",
            lambda f, p, x, t: f.mlp_task_derivatives(
                p, x, t, None, widths=[3, 4, 2], activations=["tanh", "identity"], loss="mse", input_grad=False
            )[:2],
            (r(2, 26, scale=0.5, grad=False), r(2, n, 3, grad=False), r(2, n, 2, grad=False)),
        ),
    ]
    cases += [
        (
            f"similarity_cross_entropy-{reduction}",
            lambda f, x, y, t, s, reduction=reduction: f.similarity_cross_entropy(x, y, t, "sqeuclidean", s, reduction),
            (x, y, target, scale),
        )
        for reduction in ("mean", "sum", "none")
    ]
    return cases


def test_every_op_compiles_with_dynamic_shapes():
    """torch.compile(dynamic=True) traces every op once and reruns it on
    other sizes (the second size reuses the graph or recompiles), with
    values and gradients those of the reference."""
    names = [name for name, _, _ in every_op_cases(3)]
    compiled = {
        name: torch.compile(lambda *t, case=case: case(ops, *t), dynamic=True, backend="aot_eager")
        for name, case, _ in every_op_cases(3)
    }
    for n in (3, 5, 8):
        for name, case, args in every_op_cases(n):
            got = compiled[name](*args)
            want = case(reference, *args)
            got, want = (list(v) if isinstance(v, (tuple, list)) else [v] for v in (got, want))
            for a, b in zip(got, want):
                torch.testing.assert_close(a, b, msg=f"{name}, n = {n}")
            differentiable = [t for t in args if t.requires_grad]
            outputs = [(a, b) for a, b in zip(got, want) if a.requires_grad]
            if outputs:
                weights = [torch.randn_like(b) for _, b in outputs]
                grads = [
                    torch.autograd.grad(
                        sum((o * w).sum() for (o, w) in zip(side, weights)), differentiable, allow_unused=True
                    )
                    for side in ([a for a, _ in outputs], [b for _, b in outputs])
                ]
                for a, b in zip(*grads):
                    if b is not None:
                        torch.testing.assert_close(a, b, msg=f"gradient of {name}, n = {n}")
    assert len(names) == 15


def test_nan_propagates_as_in_the_reference():
    """A NaN at the start, middle or end of any floating input gives NaN
    exactly where the reference has it, in every output of every op."""
    for name, case, args in every_op_cases(4):
        for i, arg in enumerate(args):
            if not arg.is_floating_point() or arg.numel() == 0:
                continue
            for position in (0, arg.numel() // 2, arg.numel() - 1):
                poisoned = [t.detach().clone() for t in args]
                poisoned[i].view(-1)[position] = float("nan")
                got, want = (case(f, *poisoned) for f in (ops, reference))
                got, want = (list(v) if isinstance(v, (tuple, list)) else [v] for v in (got, want))
                for k, (a, b) in enumerate(zip(got, want)):
                    assert torch.equal(a.isnan(), b.isnan()), f"{name}: NaN in input {i} at {position}, output {k}"


@pytest.mark.parametrize("device", DEVICES)
def test_vmap_over_an_extra_leading_dimension(device):
    V = 3
    x = randn(V, 2, 4, 3, dtype=torch.float64, device=device)
    y = randn(V, 2, 6, 3, dtype=torch.float64, device=device)
    values = randn(V, 2, 6, 5, dtype=torch.float64, device=device)
    target = torch.randint(0, 6, (V, 2, 4), device=device)
    support = randn(V, 6, 3, dtype=torch.float64, device=device)
    labels = torch.tensor([0, 1, 2, 0, 1, 2], device=device)
    cases = [
        (lambda x, y: ops.pairwise_distance(x, y), (x, y), (0, 0)),
        (lambda x, y: ops.similarity_log_softmax(x, y, "cosine", 2.0), (x, y), (0, 0)),
        (lambda x, y, t: ops.similarity_cross_entropy(x, y, t, "sqeuclidean", 1.0, "none"), (x, y, target), (0, 0, 0)),
        # unbatched inputs inside vmap, with y shared by all (in_dims None)
        (lambda x, y: ops.similarity_cross_entropy(x, y, target[0, 0], reduction="sum"), (x[:, 0], y[0, 0]), (0, None)),
        (lambda x, y, v: ops.attention_readout(x, y, v), (x, y, values), (0, 0, 0)),
        (lambda s: ops.class_prototypes(s, labels, 3), (support,), (0,)),
        (
            lambda a, b: ops.contrastive_loss(a, b, torch.ones(4, dtype=a.dtype, device=device), 1.0, "none"),
            (x[:, 0], x[:, 1]),
            (0, 0),
        ),
    ]
    for fn, args, in_dims in cases:
        got = torch.func.vmap(fn, in_dims=in_dims)(*args)
        slices = [[a if d is None else a[i] for a, d in zip(args, in_dims)] for i in range(V)]
        torch.testing.assert_close(got, torch.stack([fn(*s) for s in slices]))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("N", [1, 5, 9, 600])
def test_fused_forward_and_gradient_matches_the_two_pass_ops(device, reduction, N):
    x, y, scale, target, _ = inputs(device, B=3, Q=70, N=N, D=7)
    fused = ops.similarity_cross_entropy(x, y, target, "euclidean", scale, reduction)
    two_pass = getattr(ops.similarity_cross_entropy(x, y, target, "euclidean", scale, "none"), reduction)()
    torch.testing.assert_close(fused, two_pass, rtol=1e-12, atol=1e-12)
    # An output gradient of 1 takes the forward's gradients as they are, any
    # other scales them; each twice, as retain_graph=True allows.
    for output_grad in (1.0, 1.0, -0.37, -0.37):
        got = torch.autograd.grad(fused * output_grad, (x, y, scale), retain_graph=True)
        want = torch.autograd.grad(two_pass * output_grad, (x, y, scale), retain_graph=True)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_vmap_of_a_reduced_loss_that_needs_gradients(device):
    x = randn(3, 2, 4, 5, dtype=torch.float64, device=device, requires_grad=True)
    y = randn(3, 2, 300, 5, dtype=torch.float64, device=device)
    target = torch.randint(0, 300, (3, 2, 4), device=device)
    losses = torch.func.vmap(lambda x, y, t: ops.similarity_cross_entropy(x, y, t, "cosine", 2.0))(x, y, target)
    expected = torch.stack([reference.similarity_cross_entropy(x[i], y[i], target[i], "cosine", 2.0) for i in range(3)])
    torch.testing.assert_close(losses, expected)
    torch.testing.assert_close(torch.autograd.grad(losses.sum(), x)[0], torch.autograd.grad(expected.sum(), x)[0])


def reference_functions(metric):
    """The plain-PyTorch formulation of each public op in :func:`functions`
    (called with the same seed, so that the targets are the same)."""
    _, _, _, target, _ = inputs("cpu")
    labels = torch.tensor([[0, 1, 2, 0, 1, 2, 2], [2, 2, 1, 0, 0, 1, 1]])
    return {
        "similarity_log_softmax": lambda x, y, s: reference.similarity_log_softmax(x, y, metric, s),
        "similarity_cross_entropy": lambda x, y, s: reference.similarity_cross_entropy(x, y, target, metric, s, "none"),
        "similarity_cross_entropy (fused)": lambda x, y, s: reference.similarity_cross_entropy(x, y, target, metric, s),
        "similarity_cross_entropy (fused, many keys)": lambda x, y, s: reference.similarity_cross_entropy(
            x, y.repeat(1, 43, 1), target, metric, s
        ),
        "attention_readout": lambda x, y, v, s: reference.attention_readout(x, y, v, metric, s),
        "class_prototypes": lambda s: reference.class_prototypes(s, labels, 3),
        "contrastive_loss": lambda a, b, s: reference.contrastive_loss(a, b, s, 1.5, "none"),
        "pairwise_distance": lambda x, y: reference.pairwise_distance(x, y, metric),
    }


@pytest.mark.parametrize("metric", ["sqeuclidean", "cosine"])
def test_metric_ops_under_torch_func_grad_vjp_jacrev_and_maml_style_vmap(metric):
    """torch.func's grad, vjp, jacrev, and vmap over tasks of a second-order
    grad (MAML written with torch.func) agree with the reference."""
    torch.manual_seed(0)
    fast = functions("cpu", metric)
    torch.manual_seed(0)
    references = reference_functions(metric)
    for name, (fn, args) in fast.items():
        ref = references[name]
        args = tuple(a.detach() for a in args)
        argnums = tuple(range(len(args)))
        checks = {
            "grad": lambda f: torch.func.grad(lambda *a: f(*a).pow(2).sum(), argnums)(*args),
            "vjp": lambda f: torch.func.vjp(f, *args)[1](torch.ones_like(f(*args))),
            "jacrev": lambda f: torch.func.jacrev(f, argnums)(*args),
            "grad of grad": lambda f: torch.func.grad(
                lambda *a: sum(g.pow(2).sum() for g in torch.func.grad(lambda *b: f(*b).pow(2).sum(), argnums)(*a)),
                argnums,
            )(*args),
        }
        for check, transform in checks.items():
            for got, want in zip(transform(fn), transform(ref)):
                torch.testing.assert_close(got, want, msg=f"{name}, {check}")
    # MAML with torch.func: vmap over tasks of an inner step's second-order gradient
    x, y, _, target, _ = inputs("cpu")
    x, y = x.detach(), y.detach()

    def meta_loss(op, x, y, target):
        def task_loss(x):
            return op(x[None], y[None], target[None], metric).sum()

        adapted = x - 0.1 * torch.func.grad(task_loss)(x)
        return task_loss(adapted)

    got = torch.func.vmap(torch.func.grad(lambda *a: meta_loss(ops.similarity_cross_entropy, *a)))(x, y, target)
    want = torch.func.vmap(torch.func.grad(lambda *a: meta_loss(reference.similarity_cross_entropy, *a)))(x, y, target)
    torch.testing.assert_close(got, want)


def test_lstm_matching_relation_and_mann_ops_under_torch_func_grad_and_vjp():
    from fastmeta.nn import CoordinatewiseLSTM, MetaLearnerLSTM

    torch.manual_seed(0)
    d = torch.float64
    l2o, meta = CoordinatewiseLSTM().double(), MetaLearnerLSTM(torch.nn.Linear(2, 3)).double()
    grad, theta, loss = torch.randn(7, dtype=d), torch.randn(7, dtype=d), torch.rand((), dtype=d)
    l2o_state, meta_state = l2o.initial_state(grad), meta.initial_state(theta)
    query, support = torch.randn(2, 3, 4, dtype=d), torch.randn(2, 5, 4, dtype=d)
    cell = torch.nn.LSTMCell(8, 4).double()
    maps = torch.randn(1, 3, 5, 5, 2, dtype=d), torch.randn(1, 2, 5, 5, 2, dtype=d)
    mann_args = [
        torch.randn(2, 5, 3, dtype=d),
        torch.rand(2, 5, dtype=d),
        torch.softmax(torch.randn(2, 2, 5, dtype=d), -1),
        torch.randn(2, 4, 2, 3, dtype=d),
        torch.rand(2, 4, 2, dtype=d),
        torch.rand(2, 4, 2, dtype=d),
    ]
    weights = (cell.weight_ih.detach(), cell.weight_hh.detach(), (cell.bias_ih + cell.bias_hh).detach())
    cases = {
        "l2o_lstm_step": (
            lambda g, w: ops.l2o_lstm_step(g, l2o_state, w, l2o.preprocess_p, l2o.output_scale)[0],
            lambda g, w: reference.l2o_lstm_step(g, l2o_state, w, l2o.preprocess_p, l2o.output_scale)[0],
            (grad, l2o.flat_weights().detach()),
        ),
        "meta_lstm_step": (
            lambda t, w: ops.meta_lstm_step(grad, loss, t, meta_state, w)[0],
            lambda t, w: reference.meta_lstm_step(grad, loss, t, meta_state, w)[0],
            (theta, meta.flat_weights().detach()),
        ),
        "matching_attention_lstm": (
            lambda q, s: ops.matching_attention_lstm(q, s, *weights),
            lambda q, s: reference.matching_attention_lstm(q, s, *weights),
            (query, support),
        ),
        "relation_pair_pool": (ops.relation_pair_pool, reference.relation_pair_pool, maps),
        "mann_memory": (
            lambda m, k: ops.mann_memory(m, mann_args[1], mann_args[2], k, *mann_args[4:]).reads,
            lambda m, k: reference.mann_memory(m, mann_args[1], mann_args[2], k, *mann_args[4:]).reads,
            (mann_args[0], mann_args[3]),
        ),
    }
    for name, (fn, ref, args) in cases.items():
        argnums = tuple(range(len(args)))
        for got, want in zip(
            torch.func.grad(lambda *a: fn(*a).pow(2).sum(), argnums)(*args),
            torch.func.grad(lambda *a: ref(*a).pow(2).sum(), argnums)(*args),
        ):
            torch.testing.assert_close(got, want, msg=f"{name}, grad")
        cotangent = torch.randn_like(fn(*args))
        for got, want in zip(torch.func.vjp(fn, *args)[1](cotangent), torch.func.vjp(ref, *args)[1](cotangent)):
            torch.testing.assert_close(got, want, msg=f"{name}, vjp")
