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
torch.cuda.synchronize()
print("sanitizer driver: all kernels ran")
