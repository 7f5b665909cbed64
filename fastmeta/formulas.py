"""The formulas of fastmeta's ops in plain PyTorch, with the ops' signatures:
the reference the tests compare the kernels with, and what the ops' double
backward differentiates. They materialise the full ``[B, Q, N]`` similarity
matrix, and are twice differentiable. This module imports nothing of fastmeta;
:mod:`fastmeta.reference` re-exports it.
"""

import math
from typing import Union

import torch
import torch.nn.functional as F

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
    "meta_lstm_step",
    "mlp_forward",
    "mlp_task_derivatives",
    "matching_attention_lstm",
    "relation_pair_pool",
    "mann_steps",
    "mann_memory",
    "gnn_adjacency",
    "reduce_loss",
]


def reduce_loss(loss: torch.Tensor, reduction: str) -> torch.Tensor:
    """``loss`` reduced as a PyTorch loss's ``reduction`` says."""
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


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
        -2, labels.unsqueeze(-1).expand_as(support), support
    )
    return sums / counts.unsqueeze(-1)


def similarity_log_softmax(x, y, metric: str = "sqeuclidean", scale: Union[float, torch.Tensor] = 1.0):
    return _logits(x, y, metric, scale).log_softmax(-1)


def similarity_cross_entropy(
    x, y, target, metric: str = "sqeuclidean", scale: Union[float, torch.Tensor] = 1.0, reduction: str = "mean"
):
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
    second = torch.where(keep, torch.where(grad > 0, 1.0, -1.0).to(grad.dtype), grad * math.exp(preprocess_p))
    return torch.stack([first, second], -1)


def _split(weights: torch.Tensor, sizes):
    out, offset = [], 0
    for shape in sizes:
        n = math.prod(shape)
        out.append(weights[offset : offset + n].view(shape))
        offset += n
    return out


def l2o_lstm_step(
    grad: torch.Tensor,
    state: torch.Tensor,
    weights: torch.Tensor,
    preprocess_p: float = 10.0,
    output_scale: float = 0.1,
):
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
        h, c = torch.lstm_cell(
            x, (state[layer, 0].T, state[layer, 1].T), w[:, :inputs], w[:, inputs:], b, torch.zeros_like(b)
        )
        new_state.append(torch.stack([h.T, c.T]))
        x = h
    update = F.linear(x, parts[-2], parts[-1]).squeeze(-1) * output_scale
    return update, torch.stack(new_state)


def meta_lstm_step(
    grad: torch.Tensor,
    loss: torch.Tensor,
    theta: torch.Tensor,
    state: torch.Tensor,
    weights: torch.Tensor,
    preprocess_p: float = 10.0,
):
    """One step of Ravi & Larochelle's meta-learner: an ``nn.LSTMCell`` over
    (preprocessed grad, preprocessed loss) per coordinate, then
    ``theta = f * theta_prev - i * grad``. grad, theta ``[P]``, loss ``[]``,
    state ``[2H + 2, P]`` (h, c, f_prev, i_prev). Returns ``(theta, new_state)``."""
    hidden = (state.shape[0] - 2) // 2
    w, b, wf, bf, wi, bi = _split(
        weights, [(4 * hidden, 4 + hidden), (4 * hidden,), (hidden + 2,), (1,), (hidden + 2,), (1,)]
    )
    x = torch.cat(
        [log_sign_preprocess(grad, preprocess_p), log_sign_preprocess(loss, preprocess_p).expand(grad.shape[0], 2)], 1
    )
    h, c = torch.lstm_cell(
        x, (state[:hidden].T, state[hidden : 2 * hidden].T), w[:, :4], w[:, 4:], b, torch.zeros_like(b)
    )
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
        W = params[offset : offset + n_out * n_in].view(n_out, n_in)
        b = params[offset + n_out * n_in : offset + n_out * (n_in + 1)]
        offset += n_out * (n_in + 1)
        a = _MLP_ACTIVATIONS[f](a @ W.T + b)
    return a


def mlp_task_derivatives(params, x, target, direction, widths, activations, loss, input_grad):
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
    return (
        stacked(losses, ()) if T else params.new_empty(0),
        stacked(grads, (P,)),
        stacked(grads_x, (N, *features)) if with_x else x.new_empty(0, N, *features),
        stacked(hvps, (P,)) if with_hvp else params.new_empty(0, P),
        stacked(hvps_x, (N, *features)) if with_x and with_hvp else x.new_empty(0, N, *features),
    )


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


def mann_steps(memory, usage, read_weights, keys, write_gates, key_strengths, decay, slots=None):
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
    reads, memories, history, usage, _ = mann_steps(
        memory, usage, read_weights, keys, write_gates, key_strengths, decay
    )
    if keys.shape[1] == 0:
        return MannMemoryOutput(reads, memory, usage, read_weights)
    return MannMemoryOutput(reads, memories[:, -1], usage, history[:, -1])


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
