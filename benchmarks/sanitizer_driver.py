"""A small driver for compute-sanitizer (memcheck, racecheck, synccheck,
initcheck): every CUDA kernel, forward and backward, on odd sizes that do not
divide the tiles, feature sizes over several 32-wide chunks, zero sizes, the
fused cross-entropy path, NaN and infinite inputs, the MLP kernel's input
gradients and its three workspace placements, and the default and a wide
coordinatewise LSTM. Run it with PYTORCH_NO_CUDA_MEMORY_CACHING=1, so that an
access past a buffer does not land inside a cached block."""

import torch

import fastmeta
from fastmeta import ops

assert torch.cuda.is_available()
torch.manual_seed(0)
cuda = "cuda"


def similarity_ops(B, Q, N, D, V, dtype, poison=False):
    x = torch.randn(B, Q, D, device=cuda, dtype=dtype)
    y = torch.randn(B, N, D, device=cuda, dtype=dtype)
    if poison and x.numel() and y.numel():
        x[0, 0, 0], y[-1, -1, -1] = float("nan"), float("inf")
    x, y = x.requires_grad_(), y.requires_grad_()
    values = torch.randn(B, N, V, device=cuda, dtype=dtype, requires_grad=True)
    scale = torch.rand(B, Q, device=cuda, dtype=dtype, requires_grad=True)
    target = torch.randint(0, max(N, 1), (B, Q), device=cuda)
    for metric in ("sqeuclidean", "euclidean", "cosine", "dot"):
        loss = ops.similarity_log_softmax(x, y, metric, scale).sum()
        loss = loss + ops.attention_readout(x, y, values, metric, scale).sum()
        if metric != "dot":
            loss = loss + ops.pairwise_distance(x, y, metric).sum()
        if N > 0:  # cross-entropy needs a class
            loss = loss + ops.similarity_cross_entropy(x, y, target, metric, scale, "sum")
        loss.backward()


for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
    similarity_ops(3, 37, 45, 19, 7, dtype)
    similarity_ops(2, 33, 41, 70, 5, dtype)  # three feature chunks, a partial last one
    similarity_ops(2, 5, 300, 33, 3, dtype)  # N >= 256: the fused cross-entropy path
    similarity_ops(2, 9, 11, 40, 4, dtype, poison=True)  # NaN and inf rows
    for B, Q, N, D, V in ((0, 4, 5, 6, 3), (2, 0, 5, 6, 3), (2, 4, 0, 6, 3), (2, 4, 5, 0, 3), (2, 4, 5, 6, 0)):
        similarity_ops(B, Q, N, D, V, dtype)
    for B, S, D in ((3, 11, 19), (2, 9, 70), (0, 4, 3), (2, 4, 0)):
        support = torch.randn(B, S, D, device=cuda, dtype=dtype, requires_grad=True)
        labels = (torch.arange(S, device=cuda) % 4).expand(B, S).contiguous()
        ops.class_prototypes(support, labels, 4).sum().backward()
    for M, D in ((37, 19), (5, 70), (0, 3), (4, 0)):
        x1 = torch.randn(M, D, device=cuda, dtype=dtype, requires_grad=True)
        x2 = torch.randn(M, D, device=cuda, dtype=dtype)
        ops.contrastive_loss(x1, x2, (torch.arange(M, device=cuda) % 2).bool()).backward()

for dtype in (torch.float32, torch.float64):
    # Coordinatewise LSTM ops: P not a multiple of the 64-coordinate block, P = 0,
    # the default H = 20 and a larger H whose weights do not fit in shared memory.
    for hidden, P in ((7, 201), (20, 130), (20, 0), (48, 70)):
        lstm = fastmeta.nn.CoordinatewiseLSTM(hidden_size=hidden, num_layers=2).to(cuda, dtype)
        grad = 1e-3 * torch.randn(P, device=cuda, dtype=dtype)
        state = lstm.initial_state(grad).requires_grad_()
        update, new_state = lstm(grad, state)
        (update.sum() + new_state.sum()).backward()
        param = torch.zeros(P, device=cuda, dtype=dtype)
        ops.l2o_lstm_step_(param, grad, new_state.detach().clone(), lstm.flat_weights().detach())
    for hidden, P in ((6, 70), (20, 129), (20, 0)):
        weights = 0.1 * torch.randn(ops.meta_lstm_num_weights(hidden), device=cuda, dtype=dtype)
        grad = 1e-3 * torch.randn(P, device=cuda, dtype=dtype)
        theta = torch.randn(P, device=cuda, dtype=dtype)
        state = torch.zeros(2 * hidden + 2, P, device=cuda, dtype=dtype)
        loss = torch.tensor(0.5, device=cuda, dtype=dtype)
        for t in (weights, grad, theta, state, loss):
            t.requires_grad_()
        theta_new, new_state = ops.meta_lstm_step(grad, loss, theta, state, weights)
        (theta_new.sum() + new_state.sum()).backward()
    # Batched MAML through the fused MLP kernel: a workspace in static shared
    # memory, one over 48 KB (opt-in), one in global memory; with input
    # gradients (the ANIL path); and no tasks at all.
    for widths, points in (([1, 40, 40, 1], 10), ([10, 64, 64, 5], 50), ([3, 1024, 3], 600)):
        layers = []
        for w_in, w_out in zip(widths[:-1], widths[1:]):
            layers += [torch.nn.Linear(w_in, w_out), torch.nn.Tanh()]
        net = torch.nn.Sequential(*layers[:-1]).to(cuda, dtype)
        bm = fastmeta.algorithms.BatchedMAML(net, 0.01, inner_steps=2)
        assert bm.fused
        x = torch.randn(5, points, widths[0], device=cuda, dtype=dtype, requires_grad=True)
        y = torch.randn(5, points, widths[-1], device=cuda, dtype=dtype)
        bm(x, y, x, y).backward()
    params = torch.randn(0, 9, device=cuda, dtype=dtype)
    ops.mlp_task_derivatives(
        params,
        torch.randn(0, 3, 2, device=cuda, dtype=dtype),
        torch.randn(0, 3, 1, device=cuda, dtype=dtype),
        params,
        widths=[2, 2, 1],
        activations=["relu", "identity"],
        input_grad=True,
    )
torch.cuda.synchronize()
print("sanitizer driver: all kernels ran")
