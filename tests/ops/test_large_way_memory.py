"""similarity_cross_entropy never allocates [Q, N]: a 65536-way head with 65536
queries runs forward and backward in memory proportional to Q + N (the CPU's
resident set, or the CUDA caching allocator's peak)."""

import subprocess
import sys
import textwrap

import pytest

from fastmeta.testing import DEVICES

SCRIPT = textwrap.dedent("""
    import resource, sys, torch, fastmeta
    device = sys.argv[1]
    Q = N = 65536
    D = 64
    x = torch.randn(Q, D, device=device, requires_grad=True)
    y = torch.randn(N, D, device=device, requires_grad=True)
    target = torch.randint(0, N, (Q,), device=device)
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    loss = fastmeta.ops.similarity_cross_entropy(x, y, target, "sqeuclidean", 0.1)
    loss.backward()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all() and torch.isfinite(y.grad).all()
    if device == "cuda":
        print((torch.cuda.max_memory_allocated() - base) / 2**20)  # MiB
    else:
        print((after - before) / 1024)  # MiB
""")


@pytest.mark.parametrize("device", DEVICES)
def test_65536_way_head_peak_memory_is_proportional_to_q_plus_n(device):
    result = subprocess.run([sys.executable, "-c", SCRIPT, device], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    extra_mib = float(result.stdout.strip().splitlines()[-1])
    # A [Q, N] float32 buffer is 16 GiB; inputs and gradients are 16 MiB each.
    assert extra_mib < 256, f"peak memory grew by {extra_mib:.0f} MiB"
