"""A small driver for compute-sanitizer: every CUDA kernel, forward and
backward, on odd sizes that do not divide the tiles."""

import torch

import fastmeta
from fastmeta import ops

assert torch.cuda.is_available()
torch.manual_seed(0)
for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
    x = torch.randn(3, 37, 19, device="cuda", dtype=dtype, requires_grad=True)
    y = torch.randn(3, 45, 19, device="cuda", dtype=dtype, requires_grad=True)
    values = torch.randn(3, 45, 7, device="cuda", dtype=dtype, requires_grad=True)
    scale = torch.rand(3, 37, device="cuda", dtype=dtype, requires_grad=True)
    target = torch.randint(0, 45, (3, 37), device="cuda")
    for metric in ("sqeuclidean", "euclidean", "cosine", "dot"):
        loss = ops.similarity_cross_entropy(x, y, target, metric, scale)
        loss = loss + ops.similarity_log_softmax(x, y, metric, scale).sum()
        loss = loss + ops.attention_readout(x, y, values, metric, scale).sum()
        if metric != "dot":
            loss = loss + ops.pairwise_distance(x, y, metric).sum()
        loss.backward()
    support = torch.randn(3, 11, 19, device="cuda", dtype=dtype, requires_grad=True)
    labels = (torch.arange(11, device="cuda") % 4).expand(3, 11).contiguous()
    ops.class_prototypes(support, labels, 4).sum().backward()
    ops.contrastive_loss(x[0], x[1], (target[0] % 2).to(dtype)).backward()
for dtype in (torch.float32, torch.float64):
    # Coordinatewise LSTM ops: P not a multiple of the 64-coordinate block.
    lstm = fastmeta.nn.CoordinatewiseLSTM(hidden_size=7, num_layers=2).to("cuda", dtype)
    grad = 1e-3 * torch.randn(3, 67, device="cuda", dtype=dtype)
    state = lstm.initial_state(grad).requires_grad_()
    update, new_state = lstm(grad, state)
    (update.sum() + new_state.sum()).backward()
    param = torch.zeros(201, device="cuda", dtype=dtype)
    ops.l2o_lstm_step_(param, grad.reshape(-1), new_state.detach().clone(), lstm.flat_weights().detach())
    learner = torch.nn.Linear(13, 5).to("cuda", dtype)
    meta = fastmeta.nn.MetaLearnerLSTM(learner, hidden_size=6).to("cuda", dtype)
    theta, meta_state = meta(1e-3 * torch.randn(70, device="cuda", dtype=dtype),
                             torch.tensor(0.5, device="cuda", dtype=dtype), meta.initial_params)
    (theta.sum() + meta_state.sum()).backward()
    # Batched MAML: the fused MLP kernel (shared-memory workspace, and a
    # global one for a learner too wide for shared memory), through BatchedMAML.
    for widths, points in (([1, 40, 40, 1], 10), ([3, 1024, 3], 600)):
        layers = [torch.nn.Linear(widths[0], widths[1]), torch.nn.Tanh(),
                  torch.nn.Linear(widths[1], widths[2])]
        net = torch.nn.Sequential(*layers).to("cuda", dtype)
        bm = fastmeta.algorithms.BatchedMAML(net, 0.01, inner_steps=2)
        x = torch.randn(5, points, widths[0], device="cuda", dtype=dtype)
        y = torch.randn(5, points, widths[-1], device="cuda", dtype=dtype)
        bm(x, y, x, y).backward()
torch.cuda.synchronize()
print("sanitizer driver: all kernels ran")
