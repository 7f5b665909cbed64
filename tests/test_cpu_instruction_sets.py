"""The CPU row loops are compiled for AVX-512, AVX2 and baseline x86-64; the
widest the CPU has runs by default. Each variant is checked against the
reference by capping the instruction set with FASTMETA_CPU_ISA."""

import os
import platform
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import torch, fastmeta
    from fastmeta import ops, reference
    from fastmeta.testing import assert_close_to_reference
    torch.manual_seed(0)
    x = torch.randn(2, 70, 9, requires_grad=True)
    y = torch.randn(2, 600, 9, requires_grad=True)
    values = torch.randn(2, 600, 4)
    target = torch.randint(0, 600, (2, 70))
    cases = [
        lambda f, x, y, m: f.similarity_cross_entropy(x, y, target, m, 0.5),
        lambda f, x, y, m: f.similarity_log_softmax(x, y, m, 0.5).sin().sum(),
        lambda f, x, y, m: f.attention_readout(x, y, values.to(x.dtype), m, 0.5).sin().sum(),
    ]
    x64, y64 = x.detach().double().requires_grad_(), y.detach().double().requires_grad_()
    for metric in ("sqeuclidean", "euclidean", "cosine", "dot"):
        for case in cases:
            got = torch.autograd.grad(case(ops, x, y, metric), (x, y))
            want = torch.autograd.grad(case(reference, x64, y64, metric), (x64, y64))
            for g, w in zip(got, want):
                assert_close_to_reference(g, w, torch.float32)
    widths, activations = [3, 40, 17, 2], ["relu", "tanh", "identity"]
    P = sum(o * (i + 1) for i, o in zip(widths[:-1], widths[1:]))
    params, direction = torch.randn(5, P), torch.randn(5, P)
    x, target = torch.randn(5, 9, 3), torch.randn(5, 9, 2)
    got = ops.mlp_task_derivatives(params, x, target, direction, widths=widths,
                                   activations=activations, input_grad=True)
    want = reference.mlp_task_derivatives(params.double(), x.double(), target.double(),
                                          direction.double(), widths, activations, "mse", True)
    for g, w in zip(got, want):
        assert_close_to_reference(g, w, torch.float32)
    print("ok")
""")


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86-64 instruction sets")
@pytest.mark.parametrize("isa", ["baseline", "avx2", "native"])
def test_each_instruction_set_matches_the_reference(isa):
    env = dict(os.environ, FASTMETA_CPU_ISA=isa)
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env,
                            timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr
