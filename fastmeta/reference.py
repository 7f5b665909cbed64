"""Plain-PyTorch versions of every fastmeta op, with the same signatures.

They are the oracle the tests compare against and the eager baseline of the
benchmarks. They materialise the full ``[B, Q, N]`` similarity matrix, and are
twice differentiable.
"""

import math
from typing import Union

import torch
import torch.nn.functional as F

from .ops._common import reduce_loss

__all__ = [
    "pairwise_distance",
    "class_prototypes",
    "similarity",
    "similarity_log_softmax",
    "similarity_cross_entropy",
    "attention_readout",
    "contrastive_loss",
    "log_sign_preprocess",
    "l2o_lstm_step",
    "l2o_lstm_cells",
    "meta_lstm_step",
    "mlp_forward",
    "mlp_task_derivatives",
    "mann_memory",
    "gnn_adjacency",
    "gnn_logits",
    "metanet_scores",
    "mann_logits",
    "maml_query_losses_loop",
    "matching_attention_lstm",
    "prototypical_scores",
    "matching_scores",
    "relation_pair_pool",
    "relation_scores",
    "siamese_scores",
    "sample_episode_loop",
    "maml_query_losses_vmap",
    "imaml_meta_gradient_loop",
]

COSINE_EPS = 1e-8


def _sqeuclidean(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    x_sq = (x * x).sum(-1, keepdim=True)
    y_sq = (y * y).sum(-1).unsqueeze(-2)
    return (x_sq + y_sq - 2 * x @ y.transpose(-1, -2)).clamp_min(0)


def _safe_sqrt(d2: torch.Tensor) -> torch.Tensor:
    # Gradient 0 where the distance is 0, and NaN kept, as torch.cdist.
    positive = d2 > 0
    return torch.where(positive, torch.where(positive, d2, 1).sqrt(), d2 * 0)


def _cosine(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    x_unit = x / x.norm(dim=-1, keepdim=True).clamp_min(COSINE_EPS)
    y_unit = y / y.norm(dim=-1, keepdim=True).clamp_min(COSINE_EPS)
    return x_unit @ y_unit.transpose(-1, -2)


def pairwise_distance(x: torch.Tensor, y: torch.Tensor, metric: str = "sqeuclidean") -> torch.Tensor:
    if metric == "sqeuclidean":
        return _sqeuclidean(x, y)
    if metric == "euclidean":
        return _safe_sqrt(_sqeuclidean(x, y))
    if metric == "cosine":
        return 1 - _cosine(x, y)
    raise ValueError(f"unknown metric {metric!r}")


def similarity(x: torch.Tensor, y: torch.Tensor, metric: str = "sqeuclidean") -> torch.Tensor:
    """s(x, y): minus the distance for the Euclidean metrics, else cosine or dot."""
    if metric == "dot":
        return x @ y.transpose(-1, -2)
    if metric == "cosine":
        return _cosine(x, y)
    return -pairwise_distance(x, y, metric)


def _logits(x, y, metric, scale) -> torch.Tensor:
    scale = torch.as_tensor(scale, dtype=x.dtype, device=x.device)
    return similarity(x, y, metric) * (scale.unsqueeze(-1) if scale.dim() else scale)


def class_prototypes(support: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    one_hot = F.one_hot(labels, num_classes).to(support.dtype)  # [..., S, N]
    counts = one_hot.sum(-2)
    empty = (counts == 0).nonzero()
    if len(empty):
        *task, cls = empty[0].tolist()
        raise ValueError(f"class {cls} has no support examples in task {task[0] if task else 0}")
    # Sums by scatter, not one_hot^T @ support: a NaN stays in its own class.
    sums = support.new_zeros(*support.shape[:-2], num_classes, support.shape[-1]).scatter_add(
        -2, labels.unsqueeze(-1).expand_as(support), support)
    return sums / counts.unsqueeze(-1)


def similarity_log_softmax(x, y, metric: str = "sqeuclidean", scale: Union[float, torch.Tensor] = 1.0):
    return _logits(x, y, metric, scale).log_softmax(-1)


def similarity_cross_entropy(x, y, target, metric: str = "sqeuclidean",
                             scale: Union[float, torch.Tensor] = 1.0, reduction: str = "mean"):
    logits = _logits(x, y, metric, scale)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none")
    return reduce_loss(loss.view(target.shape), reduction)


def attention_readout(x, y, values, metric: str = "cosine", scale: Union[float, torch.Tensor] = 1.0):
    return _logits(x, y, metric, scale).softmax(-1) @ values


def contrastive_loss(x1, x2, same, margin: float = 1.0, reduction: str = "mean"):
    d = _safe_sqrt(((x1 - x2) ** 2).sum(-1))
    same = same.to(x1.dtype)
    loss = same * d**2 + (1 - same) * (margin - d).clamp_min(0) ** 2
    return reduce_loss(loss, reduction)


def log_sign_preprocess(grad: torch.Tensor, preprocess_p: float = 10.0) -> torch.Tensor:
    """Andrychowicz et al.'s gradient preprocessing: ``[..., 2]`` features
    ``(log|g| / p, sign g)`` where ``|g| >= e^-p``, else ``(-1, e^p g)``."""
    keep = grad.abs() >= math.exp(-preprocess_p)
    log_part = grad.abs().clamp_min(math.exp(-preprocess_p)).log() / preprocess_p
    first = torch.where(keep, log_part, -torch.ones_like(grad))
    second = torch.where(keep, torch.where(grad > 0, 1.0, -1.0).to(grad.dtype),
                         grad * math.exp(preprocess_p))
    return torch.stack([first, second], -1)


def _split(weights: torch.Tensor, sizes):
    out, offset = [], 0
    for shape in sizes:
        n = math.prod(shape)
        out.append(weights[offset:offset + n].view(shape))
        offset += n
    return out


def l2o_lstm_step(grad: torch.Tensor, state: torch.Tensor, weights: torch.Tensor,
                  preprocess_p: float = 10.0, output_scale: float = 0.1):
    """One step of the coordinatewise LSTM optimizer as ``nn.LSTMCell`` calls
    over P rows; grad ``[P]``, state ``[L, 2, H, P]``, flat weights as in
    ``csrc/math/lstm.h``. Returns ``(update [P], new_state)``."""
    num_layers, hidden = state.shape[0], state.shape[2]
    x = log_sign_preprocess(grad, preprocess_p)
    sizes = []
    for layer in range(num_layers):
        sizes += [(4 * hidden, (2 if layer == 0 else hidden) + hidden), (4 * hidden,)]
    parts = _split(weights, sizes + [(1, hidden), (1,)])
    new_state = []
    for layer in range(num_layers):
        w, b = parts[2 * layer], parts[2 * layer + 1]
        inputs = x.shape[1]
        h, c = torch.lstm_cell(x, (state[layer, 0].T, state[layer, 1].T), w[:, :inputs],
                               w[:, inputs:], b, torch.zeros_like(b))
        new_state.append(torch.stack([h.T, c.T]))
        x = h
    update = F.linear(x, parts[-2], parts[-1]).squeeze(-1) * output_scale
    return update, torch.stack(new_state)


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


def meta_lstm_step(grad: torch.Tensor, loss: torch.Tensor, theta: torch.Tensor, state: torch.Tensor,
                   weights: torch.Tensor, preprocess_p: float = 10.0):
    """One step of Ravi & Larochelle's meta-learner: an ``nn.LSTMCell`` over
    (preprocessed grad, preprocessed loss) per coordinate, then
    ``theta = f * theta_prev - i * grad``. grad, theta ``[P]``, loss ``[]``,
    state ``[2H + 2, P]`` (h, c, f_prev, i_prev). Returns ``(theta, new_state)``."""
    hidden = (state.shape[0] - 2) // 2
    w, b, wf, bf, wi, bi = _split(weights, [(4 * hidden, 4 + hidden), (4 * hidden,), (hidden + 2,),
                                            (1,), (hidden + 2,), (1,)])
    x = torch.cat([log_sign_preprocess(grad, preprocess_p),
                   log_sign_preprocess(loss, preprocess_p).expand(grad.shape[0], 2)], 1)
    h, c = torch.lstm_cell(x, (state[:hidden].T, state[hidden:2 * hidden].T), w[:, :4], w[:, 4:], b,
                           torch.zeros_like(b))
    f_prev, i_prev = state[2 * hidden], state[2 * hidden + 1]
    f = torch.sigmoid(h @ wf[:hidden] + wf[hidden] * theta + wf[hidden + 1] * f_prev + bf)
    i = torch.sigmoid(h @ wi[:hidden] + wi[hidden] * theta + wi[hidden + 1] * i_prev + bi)
    new_state = torch.cat([h.T, c.T, f.unsqueeze(0), i.unsqueeze(0)])
    return f * theta - i * grad, new_state


_MLP_ACTIVATIONS = {
    "identity": lambda z: z,
    "relu": torch.relu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "elu": F.elu,
}


def mlp_forward(params: torch.Tensor, x: torch.Tensor, widths, activations) -> torch.Tensor:
    """One task of an MLP learner with flat parameters (per layer W, then b)."""
    offset, a = 0, x
    for n_in, n_out, f in zip(widths[:-1], widths[1:], activations):
        W = params[offset:offset + n_out * n_in].view(n_out, n_in)
        b = params[offset + n_out * n_in:offset + n_out * (n_in + 1)]
        offset += n_out * (n_in + 1)
        a = _MLP_ACTIVATIONS[f](a @ W.T + b)
    return a


def mlp_task_derivatives(params, x, target, direction, widths, activations, loss,
                         input_grad):
    """``torch.ops.fastmeta.mlp_task_derivatives`` task by task with
    ``torch.autograd`` (the Hessian-vector product by double backward), with
    empty tensors for the outputs not asked for, as the op."""
    T, N = x.shape[:2]
    losses, grads, grads_x, hvps, hvps_x = [], [], [], [], []
    for t in range(T):
        p, xt = params[t].detach().requires_grad_(), x[t].detach().requires_grad_()
        out = mlp_forward(p, xt, widths, activations)
        value = ((out - target[t]) ** 2).mean() if loss == "mse" else F.cross_entropy(out, target[t])
        grad, grad_x = torch.autograd.grad(value, (p, xt), create_graph=direction is not None)
        losses.append(value.detach())
        grads.append(grad.detach())
        grads_x.append(grad_x.detach())
        if direction is not None:
            hvp, hvp_x = torch.autograd.grad(grad, (p, xt), direction[t], allow_unused=True)
            hvps.append(torch.zeros_like(p) if hvp is None else hvp)
            hvps_x.append(torch.zeros_like(xt) if hvp_x is None else hvp_x)

    def stacked(rows, shape):
        return torch.stack(rows) if rows else params.new_empty(0, *shape)

    P, features = params.shape[1], x.shape[2:]
    with_x, with_hvp = input_grad, direction is not None
    return (stacked(losses, ()) if T else params.new_empty(0),
            stacked(grads, (P,)),
            stacked(grads_x, (N, *features)) if with_x else x.new_empty(0, N, *features),
            stacked(hvps, (P,)) if with_hvp else params.new_empty(0, P),
            stacked(hvps_x, (N, *features)) if with_x and with_hvp else x.new_empty(0, N, *features))


def _named(module, params):
    return dict(zip((name for name, _ in module.named_parameters()), params))


def maml_query_losses_loop(module, loss_fn, inner_lr, steps: int, x_support, y_support, x_query,
                           y_query, first_order: bool = False):
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
            grads = torch.autograd.grad(loss_fn(out, y_support[t]), fast,
                                        create_graph=not first_order)
            fast = [p - lr * g for p, lr, g in zip(fast, lrs, grads)]
        out = torch.func.functional_call(module, _named(module, fast), (x_query[t],))
        losses.append(loss_fn(out, y_query[t]))
    return torch.stack(losses)


def maml_query_losses_vmap(module, loss_fn, inner_lr, steps: int, x_support, y_support, x_query,
                           y_query):
    """MAML vectorised with torch.func: ``grad`` for the inner steps, ``vmap``
    over tasks. Returns the query losses ``[T]``."""
    from torch.func import functional_call, grad, vmap

    params = dict(module.named_parameters())
    lrs = (dict(zip(params, inner_lr)) if isinstance(inner_lr, (list, tuple))
           else dict.fromkeys(params, inner_lr))

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


def imaml_meta_gradient_loop(module, loss_fn, inner_lr, steps: int, lam: float, cg_steps: int,
                             x_support, y_support, x_query, y_query):
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
            phi = [(p - inner_lr * (g + lam * (p - p0))).detach()
                   for p, g, p0 in zip(leaves, grads, theta)]
        leaves = [p.requires_grad_() for p in phi]
        b = torch.autograd.grad(loss_at(leaves, x_query[t], y_query[t]), leaves)
        support_grads = torch.autograd.grad(loss_at(leaves, x_support[t], y_support[t]), leaves,
                                            create_graph=True)

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


# The metric-based few-shot methods, one episode at a time, as easyfsl and most
# published code write them: the baselines of the module benchmarks and the
# oracles of the module tests.

def _class_means(features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    ways = len(torch.unique(labels))
    return torch.stack([features[labels == c].mean(0) for c in range(ways)])


def prototypical_scores(backbone, support, support_labels, query, metric: str = "euclidean"):
    """Prototypical networks' scores ``[Q, ways]``: minus the (squared)
    Euclidean distance of each query's features to each class mean."""
    prototypes = _class_means(backbone(support), support_labels)
    distance = torch.cdist(backbone(query), prototypes)
    return -(distance ** 2 if metric == "sqeuclidean" else distance)


def matching_attention_lstm(query, support, weight_ih, weight_hh, bias=None, steps=None):
    """Matching networks' attention LSTM, step by step: read the support set
    by dot-product attention, then an ``nn.LSTMCell`` step on [query, read]
    with the query added back to the hidden state."""
    hidden, cell = query, torch.zeros_like(query)
    for _ in range(support.shape[1] if steps is None else steps):
        read = torch.softmax(hidden @ support.transpose(1, 2), -1) @ support
        gates = torch.cat([query, read], -1) @ weight_ih.T + hidden @ weight_hh.T
        gates = gates if bias is None else gates + bias
        i, f, g, o = gates.chunk(4, -1)
        cell = torch.sigmoid(f) * cell + torch.sigmoid(i) * torch.tanh(g)
        hidden = torch.sigmoid(o) * torch.tanh(cell) + query
    return hidden


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


def relation_pair_pool(queries: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """``relu(max_pool2d(q_i + p_j, 2, ceil_mode=True))`` of every pair of
    ``queries [B, Q, H, W, C]`` and ``prototypes [B, N, H, W, C]`` (channels
    last), built pair by pair: ``[B, Q, N, ceil(H/2), ceil(W/2), C]``."""
    B, Q, H, W, C = queries.shape
    N = prototypes.shape[1]
    pairs = (queries[:, :, None] + prototypes[:, None]).reshape(B * Q * N, H, W, C)
    if pairs.numel() == 0:  # max_pool2d refuses empty maps; the pooled maps are empty too
        return pairs.reshape(B, Q, N, (H + 1) // 2, (W + 1) // 2, C)
    pooled = F.max_pool2d(pairs.permute(0, 3, 1, 2), 2, ceil_mode=True).relu()
    return pooled.permute(0, 2, 3, 1).reshape(B, Q, N, (H + 1) // 2, (W + 1) // 2, C)


def relation_scores(backbone, relation_module, support, support_labels, query):
    """Relation networks' scores ``[Q, ways]``: the relation module on the
    concatenation [class-mean feature map, query feature map] of every pair."""
    prototypes = _class_means(backbone(support), support_labels)
    query_features = backbone(query)
    Q, N = len(query_features), len(prototypes)
    pairs = torch.cat([prototypes[None].expand(Q, *prototypes.shape),
                       query_features[:, None].expand(Q, N, *query_features.shape[1:])], 2)
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
        picked = torch.randperm(len(members), generator=generator)[:shots + queries].tolist()
        for k, position in enumerate(picked):
            image, _ = dataset[members[position]]
            (support if k < shots else query).append(image)
            (support_labels if k < shots else query_labels).append(new_label)
    return (torch.stack(support), torch.tensor(support_labels), torch.stack(query),
            torch.tensor(query_labels))



def _mann_steps(memory, usage, read_weights, keys, write_gates, key_strengths, decay, slots=None):
    """The LRUA steps of :func:`mann_memory`; with ``slots [B, T, n]`` the
    least-used slots are taken from there instead of from the usage.
    Returns the reads, the memory and read weights after each step, the
    final usage and the least-used slots of each step."""
    B, S, W = memory.shape
    T, H = keys.shape[1], keys.shape[2]
    n = min(H, S)
    reads, memories, history, chosen = [], [], [], []
    for t in range(T):
        least = torch.sort(usage, dim=1, stable=True).indices[:, :n] if slots is None else slots[:, t]
        chosen.append(least)
        least_used = torch.zeros_like(usage).scatter(1, least, 1.0)
        keep = torch.ones_like(usage).scatter(1, least[:, :1], 0.0)
        gate = write_gates[:, t, :, None]
        write = gate * read_weights + (1 - gate) * least_used[:, None, :]  # [B, H, S]
        memory = memory * keep[..., None] + write.transpose(1, 2) @ keys[:, t]
        read_weights = torch.softmax(key_strengths[:, t, :, None] * _cosine(keys[:, t], memory), -1)
        reads.append(read_weights @ memory)
        memories.append(memory)
        history.append(read_weights)
        usage = (decay * usage + (read_weights + write).sum(1)).detach()
    def stacked(steps, *shape):
        return torch.stack(steps, 1) if steps else memory.new_zeros(B, 0, *shape)
    least = torch.stack(chosen, 1) if chosen else usage.new_zeros(B, 0, n, dtype=torch.long)
    return stacked(reads, H, W), stacked(memories, S, W), stacked(history, H, S), usage, least


def mann_memory(memory, usage, read_weights, keys, write_gates, key_strengths=1.0, decay=0.95):
    """MANN's least-recently-used-access memory (Santoro et al. 2016), step
    by step as an eager implementation writes it: the least-used slots by a
    stable sort of the usage, the write, the cosine-softmax read and the
    usage update of each step. Returns ``(reads, memory, usage,
    read_weights)`` as :func:`fastmeta.ops.mann_memory`."""
    from .ops.mann_memory import MannMemoryOutput
    if not isinstance(key_strengths, torch.Tensor):
        key_strengths = torch.full_like(write_gates, float(key_strengths))
    reads, memories, history, usage, _ = _mann_steps(memory, usage, read_weights, keys, write_gates,
                                                     key_strengths, decay)
    if keys.shape[1] == 0:
        return MannMemoryOutput(reads, memory, usage, read_weights)
    return MannMemoryOutput(reads, memories[:, -1], usage, history[:, -1])


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
        gates = (x[:, t] @ lstm.weight_ih_l0.T + lstm.bias_ih_l0
                 + hidden @ lstm.weight_hh_l0.T + lstm.bias_hh_l0)
        i, f, g, o = gates.chunk(4, -1)
        cell = torch.sigmoid(f) * cell + torch.sigmoid(i) * torch.tanh(g)
        hidden = torch.sigmoid(o) * torch.tanh(cell)
        keys, write_gates, strengths = model.head_outputs(hidden[:, None])
        reads, memory, usage, read_weights = mann_memory(memory, usage, read_weights, keys, write_gates,
                                                         strengths, model.decay)
        logits.append(model.classifier(torch.cat([hidden, reads.flatten(1)], -1)))
    return torch.stack(logits, 1) if logits else x.new_zeros(*x.shape[:2], model.num_classes)


def gnn_adjacency(nodes, weights, biases, negative_slope=0.01, last_row=False):
    """The few-shot GNN adjacency as an eager implementation computes it:
    ``|x_i - x_j|`` for every pair ``[B, n, n, F]``, the MLP on it, and a
    softmax over the other nodes; with ``last_row`` every row but the last
    is then set to 0."""
    B, n, _ = nodes.shape
    hidden = (nodes[:, :, None] - nodes[:, None]).abs()
    for layer, (weight, bias) in enumerate(zip(weights, biases)):
        hidden = F.linear(hidden, weight, bias)
        if layer < len(weights) - 1:
            hidden = F.leaky_relu(hidden, negative_slope)
    self = torch.eye(n, dtype=torch.bool, device=nodes.device)
    if n < 2:
        return hidden[..., 0] * 0
    adjacency = torch.softmax(hidden[..., 0].masked_fill(self, float("-inf")), -1).masked_fill(self, 0)
    if last_row:
        return torch.cat([torch.zeros_like(adjacency[:, :-1]), adjacency[:, -1:]], 1)
    return adjacency


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
            loss = F.cross_entropy(-torch.cdist(keys, means) ** 2, labels, reduction="sum")
            task_fast = meta(model.task_learner, torch.autograd.grad(loss, weight)[0])
        values = []
        for x, y in zip(h_s, labels):
            with torch.enable_grad():
                w1 = model.base_hidden.weight.detach().clone().requires_grad_()
                w2 = model.base_out.weight.detach().clone().requires_grad_()
                units = F.relu(x.detach() @ w1.T + model.base_hidden.bias)
                logit = units @ w2.T + model.base_out.bias
                g1, g2 = torch.autograd.grad(F.cross_entropy(logit[None], y[None]), (w1, w2))
            values.append(torch.cat([meta(model.example_learner, g1).flatten(),
                                     meta(model.example_learner, g2).flatten()]))
        keys = F.relu(model.embedding(h_s)) + F.relu(h_s @ task_fast.T)
        reads = F.relu(model.embedding(h_q)) + F.relu(h_q @ task_fast.T)
        fast = attention_readout(reads, keys, torch.stack(values), "cosine")
        logits = []
        for x, f in zip(h_q, fast):
            units = F.relu(model.base_hidden(x)) + F.relu(f[:H * D].view(H, D) @ x)
            logits.append(model.base_out(units) + f[H * D:].view(C, H) @ units)
        episodes.append(torch.stack(logits))
    return torch.stack(episodes)
