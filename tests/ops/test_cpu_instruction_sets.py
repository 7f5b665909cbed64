"""The CPU row loops are compiled for AVX-512, AVX2 and baseline x86-64; the
widest the CPU has runs by default. Each variant is checked against the
reference by capping the instruction set with FASTMETA_CPU_ISA, and
PyTorch's with it."""

import os
import platform
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import importlib
    import torch, fastmeta
    from fastmeta import ops, reference
    from fastmeta.testing import assert_close_to_reference, compare_with_reference
    torch.manual_seed(0)
    # Two key tiles (BLAS query gradients), 20 keys (combined rows, 37
    # columns: vectors and an overlapping last one), and few keys (1, 5, 8:
    # the explicit-vector loops, with and without a partial last vector; 70
    # queries, chunks of 16 rows and a partial one).
    for N, D in ((600, 9), (20, 37), (1, 37), (5, 37), (8, 48)):
        x = torch.randn(2, 70, D, requires_grad=True)
        y = torch.randn(2, N, D, requires_grad=True)
        values = torch.randn(2, N, 4)
        target = torch.randint(0, N, (2, 70))
        cases = [
            lambda f, x, y, m: f.similarity_cross_entropy(x, y, target, m, 0.5),
            lambda f, x, y, m: f.similarity_log_softmax(x, y, m, 0.5).sin().sum(),
            lambda f, x, y, m: f.attention_readout(x, y, values.to(x.dtype), m, 0.5).sin().sum(),
        ]
        for metric in ("sqeuclidean", "euclidean", "cosine", "dot"):
            for case in cases:
                compare_with_reference(lambda x, y: case(ops, x, y, metric),
                                       lambda x, y: case(reference, x, y, metric), (x, y))
    # The MLP kernel: widths below, at and across a vector of either dtype,
    # and N = 10 points (output rows in blocks of eight and two, of four and two
    # for the width 6).
    widths, activations = [3, 40, 17, 6, 2], ["relu", "tanh", "elu", "identity"]
    P = sum(o * (i + 1) for i, o in zip(widths[:-1], widths[1:]))
    params, direction = torch.randn(5, P), torch.randn(5, P)
    x, target = torch.randn(5, 10, 3), torch.randn(5, 10, 2)
    for dtype in (torch.float32, torch.float64):
        compare_with_reference(
            lambda *t: ops.mlp_task_derivatives(*t, widths=widths, activations=activations,
                                                input_grad=True),
            lambda *t: reference.mlp_task_derivatives(*t, widths, activations, "mse", True),
            [t.to(dtype) for t in (params, x, target, direction)])
    # The LSTM families, forward and backward, over chunks and a partial chunk
    # (P = 300), and the in-place step.
    P = 300
    grad = torch.randn(P) * 1e-2
    state = (0.5 * torch.randn(2, 2, 20, P)).requires_grad_()
    weights = (0.3 * torch.randn(ops.l2o_num_weights(2, 20))).requires_grad_()
    meta_state = (0.5 * torch.randn(2 * 20 + 2, P)).requires_grad_()
    meta_weights = (0.3 * torch.randn(ops.meta_lstm_num_weights(20))).requires_grad_()
    loss, theta = torch.tensor(0.7), torch.randn(P)
    steps = [(lambda f, s, w: f.l2o_lstm_step(grad.to(s.dtype), s, w), (state, weights)),
             (lambda f, s, w: f.meta_lstm_step(grad.to(s.dtype), loss.to(s.dtype), theta.to(s.dtype),
                                               s, w), (meta_state, meta_weights))]
    for step, leaves in steps:
        compare_with_reference(lambda *t: step(ops, *t), lambda *t: step(reference, *t), leaves)
    param, in_place = torch.randn(P), state.detach().clone()
    (update, new_state), (eager_update, eager_state) = (
        reference.l2o_lstm_step(grad.to(dtype), state.detach().to(dtype), weights.detach().to(dtype))
        for dtype in (torch.float64, torch.float32))
    want_param, eager_param = param.double() + update, param + eager_update
    ops.l2o_lstm_step_(param, grad, in_place, weights.detach())
    assert_close_to_reference(param, want_param, eager_param)
    assert_close_to_reference(in_place, new_state, eager_state)
    # The GNN adjacency, kept and recomputed activations, all rows and the last,
    # widths that are no multiple of a vector (9, 19, 7).
    nodes = torch.randn(3, 7, 9, requires_grad=True)
    layers = [(0.3 * torch.randn(*shape)).requires_grad_() for shape in ((19, 9), (7, 19), (1, 7))]
    biases = [(0.1 * torch.randn(shape[0])).requires_grad_() for shape in ((19,), (7,), (1,))]
    gnn_module = importlib.import_module("fastmeta.ops.gnn_adjacency")
    for last_row in (False, True):
        for limit in (gnn_module.KEPT_HIDDEN_VALUES, -1):  # kept, then recomputed
            gnn_module.KEPT_HIDDEN_VALUES = limit
            compare_with_reference(lambda *t: ops.gnn_adjacency(*t, 0.1, last_row),
                                   lambda *t: reference.gnn_adjacency(*t, 0.1, last_row),
                                   (nodes, layers, biases))
    print("ok")
""")


# Each instruction set for the whole process: fastmeta's row loops, and
# PyTorch's, MKL's and oneDNN's kernels (the eager error the tolerance is
# measured against runs with the same cap).
CAPS = {
    "baseline": dict(
        FASTMETA_CPU_ISA="baseline",
        ATEN_CPU_CAPABILITY="default",
        MKL_ENABLE_INSTRUCTIONS="SSE4_2",
        ONEDNN_MAX_CPU_ISA="SSE41",
    ),
    "avx2": dict(
        FASTMETA_CPU_ISA="avx2", ATEN_CPU_CAPABILITY="avx2", MKL_ENABLE_INSTRUCTIONS="AVX2", ONEDNN_MAX_CPU_ISA="AVX2"
    ),
    "native": {},
}


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86-64 instruction sets")
@pytest.mark.parametrize("isa", list(CAPS))
def test_each_instruction_set_matches_the_reference(isa):
    env = dict(os.environ, **CAPS[isa])
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr
