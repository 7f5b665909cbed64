"""The eager baselines of the benchmarks at the level of models and
algorithms, in plain PyTorch: each method's scores or step as its usual
PyTorch implementation computes it (easyfsl's episode-by-episode
formulations, learn2learn's per-task MAML loop, torch.func's ``vmap``, the
MANN memory step by step). The tests also compare fastmeta's modules with
them; :mod:`fastmeta.reference` re-exports them."""

import copy

import torch
import torch.nn.functional as F
from torch import nn

from ..formulas import attention_readout, gnn_adjacency, log_sign_preprocess, mann_memory

__all__ = [
    "default_layout",
    "l2o_lstm_cells",
    "maml_query_losses_loop",
    "maml_query_losses_vmap",
    "reptile_mean_adapted_loop",
    "imaml_meta_gradient_loop",
    "prototypical_scores",
    "matching_scores",
    "relation_scores",
    "siamese_scores",
    "sample_episode_loop",
    "mann_logits",
    "gnn_logits",
    "metanet_scores",
    "feat_scores",
    "simple_shot_scores",
    "finetune_scores",
    "transductive_finetuning_scores",
    "tim_scores",
    "pt_map_scores",
    "bd_cspn_scores",
    "laplacian_shot_scores",
]


def default_layout(module: nn.Module) -> nn.Module:
    """A copy of ``module`` with every :class:`fastmeta.nn.ChannelsLastConv2d`
    an ``nn.Conv2d`` with the same parameters: the model as a user of
    easyfsl or learn2learn builds it, in PyTorch's default layout."""
    from ..nn import ChannelsLastConv2d

    module = copy.deepcopy(module)
    for parent in list(module.modules()):
        for name, child in parent.named_children():
            if isinstance(child, ChannelsLastConv2d):
                conv = nn.Conv2d(
                    child.in_channels,
                    child.out_channels,
                    child.kernel_size,
                    child.stride,
                    child.padding,
                    child.dilation,
                    child.groups,
                    child.bias is not None,
                    child.padding_mode,
                ).to(child.weight)
                conv.load_state_dict(child.state_dict())
                setattr(parent, name, conv)
    return module


def l2o_lstm_cells(lstm, grad: torch.Tensor, states):
    """The step of a ``fastmeta.nn.CoordinatewiseLSTM`` written the way PyTorch
    L2O ports run it: its ``nn.LSTMCell`` layers over P rows, with state
    ``[(h, c)]`` of ``[P, H]`` per layer. Returns ``(update [P], new_states)``."""
    x = log_sign_preprocess(grad, lstm.preprocess_p)
    new_states = []
    for cell, state in zip(lstm.cells, states):
        h, c = cell(x, state)
        new_states.append((h, c))
        x = h
    return lstm.head(x).squeeze(-1) * lstm.output_scale, new_states


def _named(module, params):
    return dict(zip((name for name, _ in module.named_parameters()), params))


def maml_query_losses_loop(
    module, loss_fn, inner_lr, steps: int, x_support, y_support, x_query, y_query, first_order: bool = False
):
    """MAML as learn2learn and higher run it: a Python loop over tasks, each
    adapted with ``torch.autograd.grad(create_graph=True)``. ``inner_lr`` is a
    float or a list of per-parameter tensors (Meta-SGD). Returns the query
    losses ``[T]``, differentiable by double backward."""
    params = list(module.parameters())
    lrs = inner_lr if isinstance(inner_lr, (list, tuple)) else [inner_lr] * len(params)
    losses = []
    for t in range(x_support.shape[0]):
        fast = params
        for _ in range(steps):
            out = torch.func.functional_call(module, _named(module, fast), (x_support[t],))
            grads = torch.autograd.grad(loss_fn(out, y_support[t]), fast, create_graph=not first_order)
            fast = [p - lr * g for p, lr, g in zip(fast, lrs, grads)]
        out = torch.func.functional_call(module, _named(module, fast), (x_query[t],))
        losses.append(loss_fn(out, y_query[t]))
    return torch.stack(losses)


def maml_query_losses_vmap(module, loss_fn, inner_lr, steps: int, x_support, y_support, x_query, y_query):
    """MAML vectorised with torch.func: ``grad`` for the inner steps, ``vmap``
    over tasks. Returns the query losses ``[T]``."""
    from torch.func import functional_call, grad, vmap

    params = dict(module.named_parameters())
    lrs = dict(zip(params, inner_lr)) if isinstance(inner_lr, (list, tuple)) else dict.fromkeys(params, inner_lr)

    def task_loss(p, x, y):
        return loss_fn(functional_call(module, p, (x,)), y)

    def one_task(xs, ys, xq, yq):
        fast = params
        for _ in range(steps):
            grads = grad(task_loss)(fast, xs, ys)
            fast = {name: fast[name] - lrs[name] * grads[name] for name in fast}
        return task_loss(fast, xq, yq)

    return vmap(one_task)(x_support, y_support, x_query, y_query)


def reptile_mean_adapted_loop(module, loss_fn, inner_lr, steps: int, x, y):
    """Reptile's inner loops written plainly, task by task: each task's copy
    of the parameters takes ``steps`` SGD steps (``torch.autograd.grad``).
    Returns the tasks' mean adapted parameters, one tensor per parameter
    (Reptile then moves theta towards them)."""
    theta = [p.detach() for p in module.parameters()]
    total = [torch.zeros_like(p) for p in theta]
    for t in range(x.shape[0]):
        phi = [p.clone() for p in theta]
        for _ in range(steps):
            leaves = [p.requires_grad_() for p in phi]
            out = torch.func.functional_call(module, _named(module, leaves), (x[t],))
            grads = torch.autograd.grad(loss_fn(out, y[t]), leaves)
            phi = [(p - inner_lr * g).detach() for p, g in zip(leaves, grads)]
        total = [s + p for s, p in zip(total, phi)]
    return [s / x.shape[0] for s in total]


def imaml_meta_gradient_loop(
    module, loss_fn, inner_lr, steps: int, lam: float, cg_steps: int, x_support, y_support, x_query, y_query
):
    """iMAML's meta-gradient written plainly, task by task: ``steps``
    gradient steps on the proximal problem, then conjugate gradient on
    (I + H / lam) v = grad L_query(phi), each Hessian-vector product a double
    backward through the support loss. Returns the mean over tasks of v, as
    one tensor per parameter."""
    theta = [p.detach() for p in module.parameters()]
    total = [torch.zeros_like(p) for p in theta]
    tasks = x_support.shape[0]

    def loss_at(params, x, y):
        return loss_fn(torch.func.functional_call(module, _named(module, params), (x,)), y)

    for t in range(tasks):
        phi = [p.clone() for p in theta]
        for _ in range(steps):
            leaves = [p.requires_grad_() for p in phi]
            grads = torch.autograd.grad(loss_at(leaves, x_support[t], y_support[t]), leaves)
            phi = [(p - inner_lr * (g + lam * (p - p0))).detach() for p, g, p0 in zip(leaves, grads, theta)]
        leaves = [p.requires_grad_() for p in phi]
        b = torch.autograd.grad(loss_at(leaves, x_query[t], y_query[t]), leaves)
        support_grads = torch.autograd.grad(loss_at(leaves, x_support[t], y_support[t]), leaves, create_graph=True)

        def apply(u):
            hvp = torch.autograd.grad(support_grads, leaves, u, retain_graph=True)
            return [ui + h / lam for ui, h in zip(u, hvp)]

        def dot(a, c):
            return sum((ai * ci).sum() for ai, ci in zip(a, c))

        u = [torch.zeros_like(g) for g in b]
        r, d = list(b), list(b)
        rr = dot(r, r)
        for _ in range(cg_steps):
            ad = apply(d)
            alpha = rr / dot(d, ad)
            u = [ui + alpha * di for ui, di in zip(u, d)]
            r = [ri - alpha * ai for ri, ai in zip(r, ad)]
            rr, rr_old = dot(r, r), rr
            d = [ri + (rr / rr_old) * di for ri, di in zip(r, d)]
        total = [s + ui / tasks for s, ui in zip(total, u)]
    return total


def _class_means(features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    ways = len(torch.unique(labels))
    return torch.stack([features[labels == c].mean(0) for c in range(ways)])


def prototypical_scores(backbone, support, support_labels, query, metric: str = "euclidean"):
    """Prototypical networks' scores ``[Q, ways]``: minus the (squared)
    Euclidean distance of each query's features to each class mean."""
    prototypes = _class_means(backbone(support), support_labels)
    distance = torch.cdist(backbone(query), prototypes)
    return -(distance**2 if metric == "sqeuclidean" else distance)


def matching_scores(backbone, support_encoder, query_encoder, support, support_labels, query):
    """Matching networks' log-probabilities ``[Q, ways]`` with full-context
    embeddings (bidirectional LSTM over the support set, attention LSTM for
    the queries, one step per support example)."""
    support_features, query_features = backbone(support), backbone(query)
    D = support_features.shape[1]
    both = support_encoder(support_features[None])[0][0]
    support_features = support_features + both[:, :D] + both[:, D:]
    hidden, cell = query_features, torch.zeros_like(query_features)
    for _ in range(len(support_features)):
        attention = torch.softmax(hidden @ support_features.T, dim=1)
        read = attention @ support_features
        hidden, cell = query_encoder(torch.cat([query_features, read], 1), (hidden, cell))
        hidden = hidden + query_features
    attention = torch.softmax(hidden @ F.normalize(support_features, dim=1).T, dim=1)
    one_hot = F.one_hot(support_labels, len(torch.unique(support_labels))).to(attention.dtype)
    return (attention @ one_hot + 1e-6).log()


def relation_scores(backbone, relation_module, support, support_labels, query):
    """Relation networks' scores ``[Q, ways]``: the relation module on the
    concatenation [class-mean feature map, query feature map] of every pair."""
    prototypes = _class_means(backbone(support), support_labels)
    query_features = backbone(query)
    Q, N = len(query_features), len(prototypes)
    pairs = torch.cat(
        [
            prototypes[None].expand(Q, *prototypes.shape),
            query_features[:, None].expand(Q, N, *query_features.shape[1:]),
        ],
        2,
    )
    return relation_module(pairs.flatten(0, 1)).view(Q, N)


def siamese_scores(backbone, verifier, support, support_labels, query):
    """Siamese one-shot scores ``[Q, ways]``: each class's best verification
    score among its support examples; ``verifier`` maps ``|f(x) - f(y)|`` to
    a logit (Koch et al.), or None for minus the Euclidean distance."""
    support_features, query_features = backbone(support), backbone(query)
    if verifier is None:
        pairs = -torch.cdist(query_features, support_features)
    else:
        pairs = verifier((query_features[:, None] - support_features[None]).abs()).squeeze(-1)
    ways = len(torch.unique(support_labels))
    return torch.stack([pairs[:, support_labels == c].amax(1) for c in range(ways)], 1)


def sample_episode_loop(dataset, ways: int, shots: int, queries: int, generator=None):
    """One episode drawn as easyfsl's TaskSampler and collate do: classes and
    examples picked per class in Python, each example fetched by
    ``dataset[i]``, then stacked. Returns (support, support labels, query,
    query labels) with labels remapped to ``0..ways-1``."""
    labels = dataset.get_labels()
    by_class = {}
    for index, label in enumerate(labels):
        by_class.setdefault(label, []).append(index)
    classes = list(by_class)
    chosen = torch.randperm(len(classes), generator=generator)[:ways].tolist()
    support, support_labels, query, query_labels = [], [], [], []
    for new_label, c in enumerate(chosen):
        members = by_class[classes[c]]
        picked = torch.randperm(len(members), generator=generator)[: shots + queries].tolist()
        for k, position in enumerate(picked):
            image, _ = dataset[members[position]]
            (support if k < shots else query).append(image)
            (support_labels if k < shots else query_labels).append(new_label)
    return (torch.stack(support), torch.tensor(support_labels), torch.stack(query), torch.tensor(query_labels))


def mann_logits(model, inputs, labels):
    """:class:`fastmeta.nn.MANN`'s logits written as an eager implementation
    runs it: one step at a time, an LSTM cell, then the memory step
    (:func:`mann_memory` with one key per head), then the classifier."""
    x = model.controller_inputs(inputs, labels)
    lstm = model.controller
    hidden = x.new_zeros(x.shape[0], lstm.hidden_size)
    cell = torch.zeros_like(hidden)
    memory, usage, read_weights = model.initial_state(x.shape[0], x)
    logits = []
    for t in range(x.shape[1]):
        gates = x[:, t] @ lstm.weight_ih_l0.T + lstm.bias_ih_l0 + hidden @ lstm.weight_hh_l0.T + lstm.bias_hh_l0
        i, f, g, o = gates.chunk(4, -1)
        cell = torch.sigmoid(f) * cell + torch.sigmoid(i) * torch.tanh(g)
        hidden = torch.sigmoid(o) * torch.tanh(cell)
        keys, write_gates, strengths = model.head_outputs(hidden[:, None])
        reads, memory, usage, read_weights = mann_memory(
            memory, usage, read_weights, keys, write_gates, strengths, model.decay
        )
        logits.append(model.classifier(torch.cat([hidden, reads.flatten(1)], -1)))
    return torch.stack(logits, 1) if logits else x.new_zeros(*x.shape[:2], model.num_classes)


def gnn_logits(model, nodes):
    """:class:`fastmeta.nn.FewShotGNN`'s last-node logits ``[G, ways]`` of
    graphs ``nodes [G, n, F]``, with the eager adjacency (the ``[G, n, n,
    F]`` pair differences and the MLP's activations held in full)."""
    for metric, conv in zip(model.metrics, model.convs):
        nodes = torch.cat([nodes, conv(nodes, metric.adjacency(nodes, gnn_adjacency))], -1)
    return model.last(nodes, model.metrics[-1].adjacency(nodes, gnn_adjacency))[:, -1]


def metanet_scores(model, support_features, support_labels, query_features):
    """:class:`fastmeta.nn.MetaNetwork`'s query logits ``[B, Q, ways]``
    written as an eager implementation runs it: episode by episode, one
    ``autograd.grad`` per support example, one base-learner call per query."""
    H, D = model.base_hidden.weight.shape
    C = model.ways

    def meta(learner, grad):
        return learner(log_sign_preprocess(grad)).squeeze(-1)

    episodes = []
    for h_s, labels, h_q in zip(support_features, support_labels, query_features):
        with torch.enable_grad():
            weight = model.embedding.weight.detach().clone().requires_grad_()
            keys = F.relu(h_s.detach() @ weight.T + model.embedding.bias.detach())
            means = torch.stack([keys[labels == c].mean(0) for c in range(C)])
            loss = F.cross_entropy(-(torch.cdist(keys, means) ** 2), labels, reduction="sum")
            task_fast = meta(model.task_learner, torch.autograd.grad(loss, weight)[0])
        values = []
        for x, y in zip(h_s, labels):
            with torch.enable_grad():
                w1 = model.base_hidden.weight.detach().clone().requires_grad_()
                w2 = model.base_out.weight.detach().clone().requires_grad_()
                units = F.relu(x.detach() @ w1.T + model.base_hidden.bias)
                logit = units @ w2.T + model.base_out.bias
                g1, g2 = torch.autograd.grad(F.cross_entropy(logit[None], y[None]), (w1, w2))
            values.append(
                torch.cat([meta(model.example_learner, g1).flatten(), meta(model.example_learner, g2).flatten()])
            )
        keys = F.relu(model.embedding(h_s)) + F.relu(h_s @ task_fast.T)
        reads = F.relu(model.embedding(h_q)) + F.relu(h_q @ task_fast.T)
        fast = attention_readout(reads, keys, torch.stack(values), "cosine")
        logits = []
        for x, f in zip(h_q, fast):
            units = F.relu(model.base_hidden(x)) + F.relu(f[: H * D].view(H, D) @ x)
            logits.append(model.base_out(units) + f[H * D :].view(C, H) @ units)
        episodes.append(torch.stack(logits))
    return torch.stack(episodes)


def feat_scores(backbone, attention, support, support_labels, query, metric: str = "euclidean"):
    """FEAT's scores ``[Q, ways]``: minus the distance to the class means
    adapted by ``attention`` (a :class:`fastmeta.nn.MultiHeadAttention`,
    evaluated here without dropout as easyfsl's matrix products)."""
    prototypes = _class_means(backbone(support), support_labels)
    heads, d_k, d_v = attention.n_head, attention.d_k, attention.d_v
    q = (prototypes @ attention.w_qs.weight.T).view(-1, heads, d_k).transpose(0, 1)
    k = (prototypes @ attention.w_ks.weight.T).view(-1, heads, d_k).transpose(0, 1)
    v = (prototypes @ attention.w_vs.weight.T).view(-1, heads, d_v).transpose(0, 1)
    weights = torch.softmax(q @ k.transpose(1, 2) / d_k**0.5, dim=2)
    attended = (weights @ v).transpose(0, 1).reshape(len(prototypes), heads * d_v)
    adapted = attention.fc(attended)
    if attention.flag_norm:
        adapted = attention.layer_norm(adapted + prototypes)
    distance = torch.cdist(backbone(query), adapted)
    return -(distance**2 if metric == "sqeuclidean" else distance)


# The methods that refine the class means at inference time, one episode of
# features at a time, as the papers write them: each returns the refined
# prototypes [ways, D] and the queries' scores [Q, ways].


def _cosine(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=1) @ F.normalize(y, dim=1).T


def _entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean over rows of the entropy of softmax(logits)."""
    log_p = logits.log_softmax(1)
    return -(log_p.exp() * log_p).sum(1).mean()


def _adam(prototypes: torch.Tensor, loss_of, steps: int, lr: float) -> torch.Tensor:
    prototypes = prototypes.detach().clone().requires_grad_()
    optimizer = torch.optim.Adam([prototypes], lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            optimizer.zero_grad()
            loss_of(prototypes).backward()
            optimizer.step()
    return prototypes.detach()


def simple_shot_scores(support_features, support_labels, query_features):
    """SimpleShot: cosine similarity to the class means."""
    prototypes = _class_means(support_features, support_labels)
    return prototypes, _cosine(query_features, prototypes)


def finetune_scores(support_features, support_labels, query_features, steps=200, lr=1e-4, temperature=1.0):
    """Fine-tuning (Chen et al.): Adam on the class means minimising the
    support cross-entropy of temperature x cosine logits."""
    prototypes = _adam(
        _class_means(support_features, support_labels),
        lambda p: F.cross_entropy(temperature * _cosine(support_features, p), support_labels),
        steps,
        lr,
    )
    return prototypes, _cosine(query_features, prototypes)


def transductive_finetuning_scores(
    support_features, support_labels, query_features, steps=25, lr=5e-5, temperature=1.0
):
    """Transductive fine-tuning (Dhillon et al.) of the class means: support
    cross-entropy plus query entropy, of temperature x minus Euclidean distance."""
    prototypes = _adam(
        _class_means(support_features, support_labels),
        lambda p: (
            F.cross_entropy(-temperature * torch.cdist(support_features, p), support_labels)
            + _entropy(-temperature * torch.cdist(query_features, p))
        ),
        steps,
        lr,
    )
    return prototypes, -torch.cdist(query_features, prototypes)


def tim_scores(
    support_features,
    support_labels,
    query_features,
    steps=50,
    lr=1e-4,
    cross_entropy_weight=1.0,
    marginal_entropy_weight=1.0,
    conditional_entropy_weight=0.1,
    temperature=10.0,
):
    """TIM (Boudiaf et al.), Eq. 3 on the class means: cross-entropy minus
    the mutual information H(Y) - H(Y|X) of the queries' predictions."""

    def loss_of(p):
        query_logits = temperature * _cosine(query_features, p)
        marginal = query_logits.softmax(1).mean(0)
        return (
            cross_entropy_weight * F.cross_entropy(temperature * _cosine(support_features, p), support_labels)
            - marginal_entropy_weight * -(marginal * marginal.log()).sum()
            + conditional_entropy_weight * _entropy(query_logits)
        )

    prototypes = _adam(_class_means(support_features, support_labels), loss_of, steps, lr)
    return prototypes, _cosine(query_features, prototypes)


def _sinkhorn(cost: torch.Tensor, lam: float, epsilon: float = 1e-6, iterations: int = 1000) -> torch.Tensor:
    plan = torch.exp(-lam * cost)
    plan = plan / plan.sum()
    columns = cost.shape[0] / cost.shape[1]
    for _ in range(iterations):
        rows = plan.sum(1)
        plan = plan / (rows[:, None] + 1e-10)
        plan = plan * (columns / (plan.sum(0) + 1e-10))
        if (rows - plan.sum(1)).abs().max() < epsilon:
            break
    return plan


def pt_map_scores(support_features, support_labels, query_features, steps=10, lr=0.2, lam=10.0, power=0.5):
    """PT-MAP (Hu et al.): power transform (Eq. 1), then ``steps`` of
    Sinkhorn assignment (Eq. 3) and prototype moves (Eq. 6)."""
    support_features = (support_features.relu() + 1e-6) ** power
    query_features = (query_features.relu() + 1e-6) ** power
    prototypes = _class_means(support_features, support_labels)
    one_hot = F.one_hot(support_labels, len(prototypes)).to(prototypes.dtype)
    for _ in range(steps):
        assignments = torch.cat([one_hot, _sinkhorn(torch.cdist(query_features, prototypes) ** 2, lam)])
        features = torch.cat([support_features, query_features])
        prototypes = prototypes + lr * (assignments.T @ features / assignments.sum(0)[:, None] - prototypes)
    return prototypes, _sinkhorn(torch.cdist(query_features, prototypes) ** 2, lam)


def _rectified_prototypes(support_features, support_labels, query_features):
    """BD-CSPN's prototypes: the support and the shifted, pseudo-labelled
    queries of each class, weighted by exp(cosine similarity)."""
    prototypes = _class_means(support_features, support_labels)
    shifted = query_features + support_features.mean(0) - query_features.mean(0)
    pseudo_labels = _cosine(shifted, prototypes).argmax(1)
    rectified = []
    for c in range(len(prototypes)):
        members = torch.cat([support_features[support_labels == c], shifted[pseudo_labels == c]])
        weights = _cosine(members, prototypes[c : c + 1])[:, 0].exp()
        rectified.append((weights[:, None] * members).sum(0) / weights.sum())
    return torch.stack(rectified)


def bd_cspn_scores(support_features, support_labels, query_features):
    """BD-CSPN (Liu et al.): cosine similarity to the rectified prototypes."""
    prototypes = _rectified_prototypes(support_features, support_labels, query_features)
    return prototypes, _cosine(query_features, prototypes)


def laplacian_shot_scores(support_features, support_labels, query_features, steps=20, knn=3, lam=0.7):
    """LaplacianShot (Ziko et al.), Algorithm 1 on BD-CSPN's prototypes:
    bound updates of the assignments with the queries' kNN affinities."""
    prototypes = _rectified_prototypes(support_features, support_labels, query_features)
    a = torch.cdist(query_features, prototypes) ** 2
    nearest = torch.cdist(query_features, query_features).topk(knn, largest=False).indices[:, 1:]
    W = torch.zeros(len(query_features), len(query_features), dtype=a.dtype)
    for i, row in enumerate(nearest):
        W[i, row] = 1.0
    y = (-a).softmax(1)
    previous = float("inf")
    for i in range(steps):
        y = (-a + lam * W @ y).softmax(1)
        bound = (y * (y + 1e-12).log() + a * y - lam * (W @ y) * y).sum().item()
        if i > 1 and abs(bound - previous) <= 1e-6 * abs(previous):
            break
        previous = bound
    return prototypes, y
