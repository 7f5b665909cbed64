"""The benchmark cases (``docs/benchmarks.md``), defined once for ``fastmeta
bench`` and for the pytest-benchmark files in ``benchmarks/``.

A case builds its inputs on a device and returns variants; each variant is a
fastmeta callable and the baselines a user would otherwise run, all on the
same inputs, the first being the eager code a user would hand to
``torch.compile`` (the runner adds that baseline). Every callable runs one complete step (forward, and backward
where the case says so).
"""

from dataclasses import dataclass, field
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F
from torch import nn

from .. import nn as fnn
from .. import ops, reference
from ..algorithms import ANIL, BatchedMAML, Reptile, iMAML
from ..data import EpisodeSampler, LabelledImages, sinusoid_tasks

__all__ = ["Variant", "CASES", "DEFAULT_CASES", "build"]


@dataclass
class Variant:
    case: str
    label: str  # the variant's shape, e.g. "D=64"
    fastmeta: Callable[[], None]
    baselines: Dict[str, Callable[[], None]] = field(default_factory=dict)


def _leaf(*shape, device, generator):
    return torch.randn(*shape, generator=generator).to(device).requires_grad_()


def _backward(loss: torch.Tensor, *leaves: torch.Tensor):
    torch.autograd.grad(loss, leaves)


def proto_episode(device: str) -> List[Variant]:
    """32 tasks, 5-way, 5 support + 15 query per class, D = 1600: prototypes,
    squared Euclidean distances, log-softmax, NLL; forward + backward."""
    g = torch.Generator().manual_seed(0)
    B, N, K, Qc, D = 32, 5, 5, 15, 1600
    support = _leaf(B, N * K, D, device=device, generator=g)
    query = _leaf(B, N * Qc, D, device=device, generator=g)
    support_labels = torch.arange(N, device=device).repeat_interleave(K).expand(B, -1).contiguous()
    query_labels = torch.arange(N, device=device).repeat_interleave(Qc).expand(B, -1).contiguous()

    def fast():
        protos = ops.class_prototypes(support, support_labels, N)
        _backward(ops.similarity_cross_entropy(query, protos, query_labels), support, query)

    def eager_cdist():
        protos = support.view(B, N, K, D).mean(2)
        logits = -(torch.cdist(query, protos) ** 2)
        _backward(F.cross_entropy(logits.flatten(0, 1), query_labels.flatten()), support, query)

    def eager_matmul():
        one_hot = F.one_hot(support_labels, N).to(support.dtype)  # [B, N * K, N]
        protos = one_hot.transpose(1, 2) @ support / K
        _backward(reference.similarity_cross_entropy(query, protos, query_labels), support, query)

    baselines = {"eager (cdist)": eager_cdist, "eager (matmul)": eager_matmul}
    return [Variant("proto_episode", "32x5-way 5+15 shot D=1600", fast, baselines)]


def proto_large_way(device: str) -> List[Variant]:
    """Q = 8192 queries, N = 8192 classes, D = 64 and 512: similarity cross
    entropy forward + backward."""
    variants = []
    for D in (64, 512):
        g = torch.Generator().manual_seed(0)
        Q = N = 8192
        x = _leaf(Q, D, device=device, generator=g)
        y = _leaf(N, D, device=device, generator=g)
        target = torch.randint(0, N, (Q,), generator=g).to(device)

        def fast(x=x, y=y, target=target):
            _backward(ops.similarity_cross_entropy(x, y, target, "sqeuclidean", 0.1), x, y)

        def eager_matmul(x=x, y=y, target=target):
            _backward(reference.similarity_cross_entropy(x, y, target, "sqeuclidean", 0.1), x, y)

        def eager_cdist(x=x, y=y, target=target):
            _backward(F.cross_entropy(-0.1 * torch.cdist(x, y) ** 2, target), x, y)

        scores_grad = torch.randn(Q, N, generator=g).to(device)

        def three_products(x=x, y=y, w=scores_grad):
            # The floor of any exact float32 implementation: scores, and the two
            # products of the backward.
            with torch.no_grad():
                x @ y.T, w @ y, w.T @ x

        variants.append(
            Variant(
                "proto_large_way",
                f"Q=N=8192 D={D}",
                fast,
                {"eager (matmul)": eager_matmul, "eager (cdist)": eager_cdist, "floor: 3 products": three_products},
            )
        )
    return variants


def matching_readout(device: str) -> List[Variant]:
    """32 tasks, 20-way 1-shot, 15 queries per class, D = 64: cosine attention
    over one-hot support labels; forward + backward."""
    g = torch.Generator().manual_seed(0)
    B, N, Q, D = 32, 20, 20 * 15, 64
    x = _leaf(B, Q, D, device=device, generator=g)
    y = _leaf(B, N, D, device=device, generator=g)
    one_hot = torch.eye(N, device=device).expand(B, N, N).contiguous()
    grad_out = torch.randn(B, Q, N, generator=g).to(device)

    def fast():
        torch.autograd.grad(ops.attention_readout(x, y, one_hot, "cosine"), (x, y), grad_out)

    def eager():
        torch.autograd.grad(reference.attention_readout(x, y, one_hot, "cosine"), (x, y), grad_out)

    return [Variant("matching_readout", "32x20-way 1-shot Q=300 D=64", fast, {"eager": eager})]


LSTM_COORDINATES = (1 << 14, 1 << 20)


def lstm_step(device: str) -> List[Variant]:
    """The coordinatewise 2-layer LSTM optimizer, H = 20, over P coordinates:
    forward, and forward + backward (gradients for the weights and the
    incoming state)."""
    variants = []
    sizes = LSTM_COORDINATES + ((25 * (1 << 20),) if device == "cuda" else ())
    for P in sizes:
        g = torch.Generator().manual_seed(0)
        lstm = fnn.CoordinatewiseLSTM().to(device)
        grad = (torch.randn(P, generator=g) * 1e-3).to(device)
        state = (0.1 * torch.randn(2, 2, 20, P, generator=g)).to(device).requires_grad_()
        rows = [
            (state[l, 0].T.contiguous().requires_grad_(), state[l, 1].T.contiguous().requires_grad_()) for l in range(2)
        ]
        grad_update = torch.randn(P, generator=g).to(device)
        grad_state = torch.randn(2, 2, 20, P, generator=g).to(device)
        grad_rows = [t for l in range(2) for t in (grad_state[l, 0].T.contiguous(), grad_state[l, 1].T.contiguous())]
        weights = list(lstm.parameters())
        label = f"P={P // 1024}k" if P < 1 << 20 else f"P={P >> 20}M"

        @torch.no_grad()
        def fast_forward(lstm=lstm, grad=grad, state=state):
            return lstm(grad, state)

        @torch.no_grad()
        def cells_forward(lstm=lstm, grad=grad, rows=rows):
            return reference.l2o_lstm_cells(lstm, grad, rows)

        def fast_backward(lstm=lstm, grad=grad, state=state, gu=grad_update, gs=grad_state, weights=weights):
            update, new_state = lstm(grad, state)
            torch.autograd.grad((update, new_state), [state] + weights, (gu, gs))

        def cells_backward(lstm=lstm, grad=grad, rows=rows, gu=grad_update, gs=grad_rows, weights=weights):
            update, new_states = reference.l2o_lstm_cells(lstm, grad, rows)
            outputs = [update] + [t for hc in new_states for t in hc]
            torch.autograd.grad(outputs, [t for hc in rows for t in hc] + weights, [gu] + gs)

        variants.append(Variant("lstm_step", f"{label} forward", fast_forward, {"nn.LSTMCell": cells_forward}))
        variants.append(
            Variant("lstm_step", f"{label} forward+backward", fast_backward, {"nn.LSTMCell": cells_backward})
        )
    return variants


def meta_lstm_step(device: str) -> List[Variant]:
    """The Ravi & Larochelle meta-learner cell, H = 20, over P = 33k (a
    conv4-32 learner) and 1M coordinates: forward + backward (gradients for
    the weights, the incoming state and theta)."""
    variants = []
    for P in (33 * 1024, 1 << 20):
        g = torch.Generator().manual_seed(0)
        H = 20
        weights = (0.1 * torch.randn(ops.meta_lstm_num_weights(H), generator=g)).to(device)
        weights.requires_grad_()
        grad = (torch.randn(P, generator=g) * 1e-3).to(device)
        loss = torch.tensor(1.5, device=device)
        theta = torch.randn(P, generator=g).to(device).requires_grad_()
        state = (0.1 * torch.randn(2 * H + 2, P, generator=g)).to(device).requires_grad_()
        grad_theta = torch.randn(P, generator=g).to(device)
        grad_state = torch.randn(2 * H + 2, P, generator=g).to(device)

        def run(step, grad=grad, loss=loss, theta=theta, state=state, weights=weights, gt=grad_theta, gs=grad_state):
            outputs = step(grad, loss, theta, state, weights)
            torch.autograd.grad(outputs, (theta, state, weights), (gt, gs))

        label = f"P={P // 1024}k" if P < 1 << 20 else f"P={P >> 20}M"
        variants.append(
            Variant(
                "meta_lstm_step",
                f"{label} forward+backward",
                lambda run=run: run(ops.meta_lstm_step),
                {"eager": lambda run=run: run(reference.meta_lstm_step)},
            )
        )
    return variants


def _maml_variants(case: str, label: str, net: nn.Module, loss: str, inner_lr: float, steps: int, tasks) -> Variant:
    """BatchedMAML against the per-task create_graph loop and torch.func, all
    computing the meta-gradient of the module's parameters."""
    params = list(net.parameters())
    bm = BatchedMAML(net, inner_lr, steps, loss=loss)
    loss_fn = F.mse_loss if loss == "mse" else F.cross_entropy

    def baseline(query_losses):
        return lambda: torch.autograd.grad(query_losses(net, loss_fn, inner_lr, steps, *tasks).mean(), params)

    return Variant(
        case,
        label,
        lambda: torch.autograd.grad(bm(*tasks), params),
        {
            "per-task loop": baseline(reference.maml_query_losses_loop),
            "torch.func vmap": baseline(reference.maml_query_losses_vmap),
        },
    )


def maml_sinusoid(device: str) -> List[Variant]:
    """Second-order MAML meta-gradient: MLP 1-40-40-1 ReLU, 25 sinusoid tasks
    of 10 support and 10 query points, 1 and 5 inner steps (fused path); and
    1000 tasks, where peak memory is large enough to measure on the CPU."""
    variants = []
    for tasks_per_batch, steps in ((25, 1), (25, 5), (1000, 5)):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1)).to(device)
        tasks = sinusoid_tasks(
            tasks_per_batch, 10, num_query=10, generator=torch.Generator().manual_seed(0), device=device
        )
        label = f"T={tasks_per_batch} {steps} inner step{'s' * (steps > 1)}"
        variants.append(_maml_variants("maml_sinusoid", label, net, "mse", 0.01, steps, tasks))
    return variants


def conv4(channels: int, filters: int, size: int, ways: int) -> nn.Module:
    """The conv4 learner of MAML: four blocks of 3x3 convolution, batch norm
    (batch statistics), ReLU and 2x2 max-pooling, then a linear classifier."""
    layers, c = [], channels
    for _ in range(4):
        layers += [
            nn.Conv2d(c, filters, 3, padding=1),
            nn.BatchNorm2d(filters, track_running_stats=False),
            nn.ReLU(),
            nn.MaxPool2d(2),
        ]
        c, size = filters, size // 2
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(filters * size * size, ways))


def _conv4_tasks(channels, filters, size, tasks, device, ways=5, queries=15):
    torch.manual_seed(0)
    net = conv4(channels, filters, size, ways).to(device)
    g = torch.Generator().manual_seed(0)
    x_support = torch.randn(tasks, ways, channels, size, size, generator=g).to(device)
    x_query = torch.randn(tasks, ways * queries, channels, size, size, generator=g).to(device)
    y_support = torch.arange(ways, device=device).expand(tasks, -1).contiguous()
    y_query = torch.arange(ways, device=device).repeat_interleave(queries).expand(tasks, -1)
    return net, (x_support, y_support, x_query, y_query.contiguous())


def maml_conv4(device: str) -> List[Variant]:
    """MAML meta-gradients of a conv4 learner (generic path), 5-way 1-shot
    with 15 queries per class, 28x28x1 with 64 filters and 84x84x3 with 32
    filters, 4 tasks of 5 inner steps and 32 tasks of 1: second order against
    the per-task loop and torch.func; first order and ANIL (the head adapted,
    the body's features computed once for all tasks on both sides) against
    their per-task loops."""
    variants = []
    for channels, filters, size in ((1, 64, 28), (3, 32, 84)):
        for tasks, steps in ((4, 5), (32, 1)):
            net, data = _conv4_tasks(channels, filters, size, tasks, device)
            label = f"{size}x{size}x{channels} {filters}f T={tasks} K={steps}"
            variants.append(_maml_variants("maml_conv4", label, net, "cross_entropy", 0.4, steps, data))
            params = list(net.parameters())
            first = BatchedMAML(net, 0.4, steps, first_order=True, loss="cross_entropy")
            variants.append(
                Variant(
                    "maml_conv4",
                    label + " first order",
                    lambda m=first, d=data, p=params: torch.autograd.grad(m(*d), p),
                    {
                        "per-task loop": lambda d=data, p=params, n=net, k=steps: torch.autograd.grad(
                            reference.maml_query_losses_loop(n, F.cross_entropy, 0.4, k, *d, first_order=True).mean(), p
                        )
                    },
                )
            )
            body, head = net[:-1], nn.Sequential(net[-1])
            anil = ANIL(body, head, 0.4, steps)

            def features(images, body=body):
                return body(images.flatten(0, 1)).unflatten(0, images.shape[:2])

            def anil_fast(d=data, m=anil, p=params):
                return torch.autograd.grad(m(*d), p)

            def anil_loop(d=data, h=head, p=params, k=steps, features=features):
                losses = reference.maml_query_losses_loop(
                    h, F.cross_entropy, 0.4, k, features(d[0]), d[1], features(d[2]), d[3]
                )
                return torch.autograd.grad(losses.mean(), p)

            variants.append(Variant("maml_conv4", label + " ANIL", anil_fast, {"per-task loop": anil_loop}))
    return variants


def imaml_conv4(device: str) -> List[Variant]:
    """iMAML's meta-gradient of the 28x28x1 64-filter conv4 learner, 4 tasks
    of 5-way 1-shot with 15 queries per class, 5 conjugate-gradient steps,
    5 and 16 inner steps: BatchedMAML-style batched Hessian-vector products
    against the plain computation, task by task, each product a double
    backward."""
    variants = []
    for steps in (5, 16):
        net, data = _conv4_tasks(1, 64, 28, 4, device)
        params = list(net.parameters())
        imaml = iMAML(net, 0.1, steps, lam=2.0, cg_steps=5, loss="cross_entropy")
        variants.append(
            Variant(
                "imaml_conv4",
                f"28x28x1 64f T=4 K={steps} CG=5",
                lambda m=imaml, d=data, p=params: torch.autograd.grad(m(*d), p),
                {
                    "plain, task by task": lambda n=net, d=data, k=steps: reference.imaml_meta_gradient_loop(
                        n, F.cross_entropy, 0.1, k, 2.0, 5, *d
                    )
                },
            )
        )
    return variants


def reptile_conv4(device: str) -> List[Variant]:
    """Reptile's inner loops on the conv4 learners of maml_conv4, each task
    training on its 5 support and 75 query images (outer step size 0, so the
    parameters stay put between calls): Reptile.step against the plain
    task-by-task loop."""
    variants = []
    for channels, filters, size in ((1, 64, 28), (3, 32, 84)):
        for tasks, steps in ((4, 5), (32, 1)):
            net, (x_s, y_s, x_q, y_q) = _conv4_tasks(channels, filters, size, tasks, device)
            x, y = torch.cat([x_s, x_q], 1), torch.cat([y_s, y_q], 1)
            reptile = Reptile(net, 0.4, steps, outer_lr=0.0, loss="cross_entropy")
            variants.append(
                Variant(
                    "reptile_conv4",
                    f"{size}x{size}x{channels} {filters}f T={tasks} K={steps}",
                    lambda m=reptile, x=x, y=y: m.step(x, y),
                    {
                        "per-task loop": lambda n=net, x=x, y=y, k=steps: reference.reptile_mean_adapted_loop(
                            n, F.cross_entropy, 0.4, k, x, y
                        )
                    },
                )
            )
    return variants


def _episode_images(batch, ways, shots, queries, image_shape, device, generator, requires_grad=False):
    """Random episodes (images, or features with ``requires_grad``), labels grouped by class."""
    support = torch.rand(batch, ways * shots, *image_shape, generator=generator).to(device)
    query = torch.rand(batch, ways * queries, *image_shape, generator=generator).to(device)
    support.requires_grad_(requires_grad)
    query.requires_grad_(requires_grad)
    support_labels = torch.arange(ways, device=device).repeat_interleave(shots).expand(batch, -1)
    query_labels = torch.arange(ways, device=device).repeat_interleave(queries).expand(batch, -1)
    return support, support_labels.contiguous(), query, query_labels.contiguous()


def _training_step(model: nn.Module, loss_fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
    """One whole training step: forward, backward and an Adam update."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss_fn().backward()
        optimizer.step()

    return step


def _module_variants(case, label, model, reference_scores, loss_of_scores, episodes, head_only):
    """A whole training step of ``model`` (its batched ``loss``) against the
    easyfsl-style formulation ``reference_scores(model, ...)`` run episode by
    episode, as easyfsl runs it, on a copy of the model in PyTorch's default
    layout. With ``head_only``, the backbone is the identity and the episodes
    are features that require grad."""
    support, support_labels, query, query_labels = episodes
    batch = support.shape[0]
    eager_model = reference.default_layout(model)

    def eager_loss():
        return (
            sum(
                loss_of_scores(reference_scores(eager_model, support[b], support_labels[b], query[b]), query_labels[b])
                for b in range(batch)
            )
            / batch
        )

    fast = lambda: model.loss(support, support_labels, query, query_labels)  # noqa: E731
    if head_only:
        leaves, eager_leaves = [support, query, *model.parameters()], [support, query, *eager_model.parameters()]
        return Variant(
            case,
            label + " head",
            lambda: _backward(fast(), *leaves),
            {"eager (easyfsl)": lambda: _backward(eager_loss(), *eager_leaves)},
        )
    return Variant(
        case, label, _training_step(model, fast), {"eager (easyfsl)": _training_step(eager_model, eager_loss)}
    )


def _cross_entropy(scores, labels):
    return F.cross_entropy(scores, labels)


def protonet_step(device: str) -> List[Variant]:
    """Prototypical networks, Conv4 on 28x28x1: 60-way 5-shot 5-query (Snell
    et al.'s training episodes) and 32 episodes of 5-way 1-shot 15-query;
    whole training step, and the head alone on 64-d features."""
    variants = []
    for batch, ways, shots, queries in ((1, 60, 5, 5), (32, 5, 1, 15)):
        label = f"{batch}x{ways}-way {shots}+{queries}"
        for head_only in (False, True):
            g = torch.Generator().manual_seed(0)
            torch.manual_seed(0)
            backbone = nn.Identity() if head_only else fnn.Conv4(1)
            model = fnn.PrototypicalNetworks(backbone, metric="sqeuclidean").to(device)
            episodes = _episode_images(
                batch, ways, shots, queries, (64,) if head_only else (1, 28, 28), device, g, requires_grad=head_only
            )
            variants.append(
                _module_variants(
                    "protonet_step",
                    label,
                    model,
                    lambda m, s, l, q: reference.prototypical_scores(m.backbone, s, l, q, "sqeuclidean"),
                    _cross_entropy,
                    episodes,
                    head_only,
                )
            )
        if device == "cpu" and batch > 1:
            # what a user who batches by hand would write: one backbone call
            base = variants[-2]
            support, support_labels, query, query_labels = _episode_images(
                batch, ways, shots, queries, (1, 28, 28), device, torch.Generator().manual_seed(0)
            )
            torch.manual_seed(0)
            net = reference.default_layout(fnn.Conv4(1).to(device))

            def batched_eager():
                s = net(support.flatten(0, 1)).view(batch, ways, shots, -1).mean(2)
                q = net(query.flatten(0, 1)).view(batch, ways * queries, -1)
                logits = -(torch.cdist(q, s) ** 2)
                return F.cross_entropy(logits.flatten(0, 1), query_labels.flatten())

            base.baselines["eager (batched by hand)"] = _training_step(net, batched_eager)
    return variants


def relation_step(device: str) -> List[Variant]:
    """Relation networks on Conv4 feature maps (28x28x1 -> 64x7x7): 5-way
    1-shot 19-query and 20-way 1-shot 10-query; whole training step, and the
    head (prototypes and relation module) alone."""
    variants = []
    for ways, queries in ((5, 19), (20, 10)):
        for head_only in (False, True):
            g = torch.Generator().manual_seed(0)
            torch.manual_seed(0)
            backbone = nn.Identity() if head_only else fnn.Conv4(1, pooled_blocks=2, flatten=False)
            model = fnn.RelationNetworks(backbone, feature_dimension=64).to(device)
            episodes = _episode_images(
                1, ways, 1, queries, (64, 7, 7) if head_only else (1, 28, 28), device, g, requires_grad=head_only
            )

            def mse(scores, labels):
                return F.mse_loss(scores, F.one_hot(labels, scores.shape[-1]).to(scores.dtype))

            variants.append(
                _module_variants(
                    "relation_step",
                    f"{ways}-way 1+{queries}",
                    model,
                    lambda m, s, l, q: reference.relation_scores(m.backbone, m.relation_module, s, l, q),
                    mse,
                    episodes,
                    head_only,
                )
            )
    return variants


def matching_fce_step(device: str) -> List[Variant]:
    """Matching networks with full-context embeddings, Conv4 on 28x28x1,
    20-way 1-shot 15-query; whole training step, and the head (support and
    attention LSTMs and the readouts) alone on 64-d features."""
    variants = []
    for head_only in (False, True):
        g = torch.Generator().manual_seed(0)
        torch.manual_seed(0)
        model = fnn.MatchingNetworks(nn.Identity() if head_only else fnn.Conv4(1), feature_dimension=64).to(device)
        episodes = _episode_images(
            1, 20, 1, 15, (64,) if head_only else (1, 28, 28), device, g, requires_grad=head_only
        )
        variants.append(
            _module_variants(
                "matching_fce_step",
                "20-way 1+15",
                model,
                lambda m, s, l, q: reference.matching_scores(m.backbone, m.support_encoder, m.query_encoder, s, l, q),
                lambda scores, labels: F.nll_loss(scores, labels),
                episodes,
                head_only,
            )
        )
    return variants


def mann_episode(device: str) -> List[Variant]:
    """MANN (Santoro et al. 2016): 16 episodes of 5 classes x 10 examples (50
    steps), 20x20 inputs, LSTM controller of 200, 4 read heads, 128 x 40
    memory; forward and backward of the whole batch."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = fnn.MANN(400, 5).to(device)
    inputs = torch.rand(16, 50, 1, 20, 20, generator=g).to(device)
    labels = torch.stack(
        [torch.arange(5).repeat_interleave(10)[torch.randperm(50, generator=g)] for _ in range(16)]
    ).to(device)
    params = list(model.parameters())

    def eager():
        logits = reference.mann_logits(model, inputs, labels)
        _backward(F.cross_entropy(logits.flatten(0, 1), labels.flatten()), *params)

    return [
        Variant(
            "mann_episode",
            "16x50 steps, 4 heads, 128x40",
            lambda: _backward(model.loss(inputs, labels), *params),
            {"eager LRUA": eager},
        )
    ]


def gnn_episode(device: str) -> List[Variant]:
    """Few-shot GNN (Garcia & Bruna 2018) on 64-d embeddings, 32 episodes of
    one query each (the paper's training episodes): 5-way 1-shot (6-node
    graphs) and 20-way 5-shot (101 nodes); two graph layers and the last,
    metric MLPs of widths [2, 2, 1, 1] x the node width; forward and
    backward."""

    def variant(ways: int, shots: int) -> Variant:
        g = torch.Generator().manual_seed(0)
        torch.manual_seed(0)
        model = fnn.FewShotGNN(feature_dimension=64, ways=ways).to(device)
        support, support_labels, _, _ = _episode_images(32, ways, shots, 0, (64,), device, g, requires_grad=True)
        query = torch.randn(32, 1, 64, generator=g).to(device).requires_grad_()
        query_labels = torch.randint(0, ways, (32, 1), generator=g).to(device)
        leaves = [support, query, *model.parameters()]

        def eager():
            graphs = model.query_graphs(model.prepare_support(support, support_labels, ways), query)
            logits = reference.gnn_logits(model, graphs)
            _backward(F.cross_entropy(logits, query_labels.flatten()), *leaves)

        return Variant(
            "gnn_episode",
            f"32x{ways}-way {shots}-shot, 1 query",
            lambda: _backward(model.loss(support, support_labels, query, query_labels), *leaves),
            {"eager [B, n, n, D]": eager},
        )

    return [variant(5, 1), variant(20, 5)]


def metanet_episode(device: str) -> List[Variant]:
    """Meta Networks (Munkhdalai & Yu 2017) on 64-d embeddings: 32 episodes
    of 5-way 1-shot 15-query; forward and backward."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = fnn.MetaNetwork(feature_dimension=64, ways=5).to(device)
    support, support_labels, query, query_labels = _episode_images(32, 5, 1, 15, (64,), device, g, requires_grad=True)
    leaves = [support, query, *model.parameters()]

    def eager():
        scores = reference.metanet_scores(model, support, support_labels, query)
        _backward(F.cross_entropy(scores.flatten(0, 1), query_labels.flatten()), *leaves)

    return [
        Variant(
            "metanet_episode",
            "32x5-way 1+15",
            lambda: _backward(model.loss(support, support_labels, query, query_labels), *leaves),
            {"eager": eager},
        )
    ]


def transductive_inference(device: str) -> List[Variant]:
    """TIM, PT-MAP and LaplacianShot inference (easyfsl's defaults) on 16
    episodes of 640-d features (ResNet-12's), 5-way and 20-way, 5 shots and
    15 queries per class: the batched modules against the methods'
    equations run episode by episode (easyfsl's way)."""
    variants = []
    methods = [
        ("TIM", fnn.TIM, reference.tim_scores),
        ("PT-MAP", fnn.PTMAP, reference.pt_map_scores),
        ("LaplacianShot", fnn.LaplacianShot, reference.laplacian_shot_scores),
    ]
    for ways in (5, 20):
        g = torch.Generator().manual_seed(0)
        B, shots, queries, D = 16, 5, 15, 640
        # Features around a centre per class, non-negative as after a ReLU, of norm about 1.
        centres = torch.rand(B, ways, 1, D, generator=g)
        support, query = (
            ((centres + 0.5 * torch.rand(B, ways, n, D, generator=g)) / D**0.5).flatten(1, 2).to(device)
            for n in (shots, queries)
        )
        labels = torch.arange(ways, device=device).repeat_interleave(shots).expand(B, -1).contiguous()
        for name, module, per_episode in methods:
            model = module()

            def fast(model=model, support=support, labels=labels, query=query):
                return model.score_episodes(support, labels, query)

            def episode_by_episode(per_episode=per_episode, support=support, labels=labels, query=query):
                return [per_episode(support[b], labels[b], query[b]) for b in range(B)]

            variants.append(
                Variant(
                    "transductive_inference",
                    f"{name} 16x{ways}-way 5+15 D=640",
                    fast,
                    {"per-episode (easyfsl)": episode_by_episode},
                )
            )
    return variants


def episode_sampling(device: str) -> List[Variant]:
    """32 episodes of 5-way 1-shot 15-query drawn from a 32,000-image
    in-memory dataset (1600 classes of 20 images, 28x28): the vectorised
    sampler against easyfsl's per-example sampling and collate."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (32000, 1, 28, 28), generator=g, dtype=torch.uint8)
    data = LabelledImages(images.to(device), torch.arange(1600).repeat_interleave(20))
    sampler = EpisodeSampler(data, 5, 1, 15, episodes_per_batch=32, seed=0)

    def loop():
        return [reference.sample_episode_loop(data, 5, 1, 15, generator=g) for _ in range(32)]

    return [
        Variant(
            "episode_sampling", "32x5-way 1+15 of 32,000 images", sampler.sample, {"per-example loop (easyfsl)": loop}
        )
    ]


CASES: Dict[str, Callable[[str], List[Variant]]] = {
    "proto_episode": proto_episode,
    "proto_large_way": proto_large_way,
    "matching_readout": matching_readout,
    "lstm_step": lstm_step,
    "meta_lstm_step": meta_lstm_step,
    "maml_sinusoid": maml_sinusoid,
    "maml_conv4": maml_conv4,
    "imaml_conv4": imaml_conv4,
    "reptile_conv4": reptile_conv4,
    "protonet_step": protonet_step,
    "relation_step": relation_step,
    "matching_fce_step": matching_fce_step,
    "episode_sampling": episode_sampling,
    "transductive_inference": transductive_inference,
    "mann_episode": mann_episode,
    "gnn_episode": gnn_episode,
    "metanet_episode": metanet_episode,
}


# What `fastmeta bench` runs by default: one case of each kernel family and
# method, a few minutes on a 2-core CPU (--all adds lstm_step, proto_large_way,
# maml_conv4, imaml_conv4, reptile_conv4, protonet_step and gnn_episode, the long ones).
DEFAULT_CASES = [
    "proto_episode",
    "matching_readout",
    "meta_lstm_step",
    "maml_sinusoid",
    "relation_step",
    "matching_fce_step",
    "episode_sampling",
    "mann_episode",
    "metanet_episode",
]


def build(names, device: str) -> List[Variant]:
    unknown = [n for n in names if n not in CASES]
    if unknown:
        raise ValueError(f"unknown benchmark case(s) {unknown}; known: {sorted(CASES)}")
    return [v for n in names for v in CASES[n](device)]
