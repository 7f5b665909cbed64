"""Helpers for fastmeta's tests: devices, dtypes, and tolerances measured
against PyTorch's own error at the same precision."""

import os
import subprocess
import sys
from typing import Callable, Optional, Sequence

import torch
from torch.utils import _pytree as pytree

__all__ = [
    "DEVICES",
    "FLOAT_DTYPES",
    "ERROR_FACTOR",
    "FLOOR_ULPS",
    "dtypes_for",
    "assert_close_to_reference",
    "compare_with_reference",
    "randn",
    "run_until_device_assertion",
]

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
FLOAT_DTYPES = [torch.float32, torch.float64]
_LOW_PRECISION = [torch.float16, torch.bfloat16]

# fastmeta's error against the float64 reference may be at most ERROR_FACTOR
# times eager PyTorch's error on the same inputs in the same dtype, plus a
# floor of FLOOR_ULPS units in the last place of the reference's largest
# magnitude, or of 1 where that is smaller (for results eager PyTorch happens
# to get nearly exactly right, such as sums and gradients that cancel).
# docs/testing.md gives the ratios the whole suite measured.
ERROR_FACTOR = 8.0
FLOOR_ULPS = {torch.float64: 2.0**14, torch.float32: 64.0, torch.float16: 8.0, torch.bfloat16: 8.0}


def dtypes_for(device: str):
    """The dtypes with kernels on `device`: low precision on CUDA only."""
    return FLOAT_DTYPES + (_LOW_PRECISION if device == "cuda" else [])


def randn(*shape, dtype=torch.float32, device="cpu", requires_grad=False, generator=None):
    t = torch.randn(*shape, dtype=torch.float64, generator=generator).to(device=device, dtype=dtype)
    return t.requires_grad_(requires_grad)


def _max_error(result: torch.Tensor, expected: torch.Tensor) -> float:
    finite = expected.isfinite()
    return (result.double()[finite] - expected[finite]).abs().max().item() if finite.any() else 0.0


def assert_close_to_reference(
    actual: torch.Tensor, expected: torch.Tensor, eager: Optional[torch.Tensor] = None, msg: str = ""
):
    """Checks fastmeta's ``actual`` against the float64 reference ``expected``,
    with eager PyTorch's error as the tolerance.

    ``eager`` is the plain-PyTorch reference computed on the same inputs in
    ``actual``'s dtype (needed unless that dtype is float64). The largest
    absolute error of ``actual`` may be ``ERROR_FACTOR`` times that of
    ``eager``, plus ``FLOOR_ULPS`` units in the last place of the
    reference's magnitude (at least 1). NaN and infinities must sit where the reference has
    them.
    """
    dtype = actual.dtype
    if eager is None and dtype != torch.float64:
        raise ValueError(f"comparing a {dtype} result needs eager PyTorch's result in {dtype}")
    expected = expected.detach().double().cpu()
    actual = actual.detach().cpu()
    where = f"{msg}: " if msg else ""
    assert actual.shape == expected.shape, f"{where}shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    special = ~expected.isfinite()
    torch.testing.assert_close(
        actual.double()[special],
        expected[special],
        equal_nan=True,
        msg=f"{where}NaN or infinity where the reference has none, or missing",
    )
    assert actual.double()[~special].isfinite().all(), f"{where}NaN or infinity where the reference is finite"
    error = _max_error(actual, expected)
    eager_error = 0.0 if eager is None else _max_error(eager.detach().cpu(), expected)
    magnitude = expected[~special].abs().max().item() if (~special).any() else 0.0
    floor = FLOOR_ULPS[dtype] * torch.finfo(dtype).eps * max(magnitude, 1.0)
    allowed = ERROR_FACTOR * eager_error + floor
    _log(dtype, error, eager_error, floor)
    assert error <= allowed, (
        f"{where}largest error {error:.3e} against the float64 reference; "
        f"eager PyTorch's in {dtype}: {eager_error:.3e}, allowed "
        f"{ERROR_FACTOR:g} x that + {floor:.3e}"
    )


def _log(dtype, error, eager_error, floor):
    """With FASTMETA_TOLERANCE_LOG=PATH, appends each comparison's errors (how
    ERROR_FACTOR and FLOOR_ULPS were measured)."""
    path = os.environ.get("FASTMETA_TOLERANCE_LOG")
    if path:
        with open(path, "a") as f:
            test = os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0]
            f.write(f"{str(dtype)[6:]}\t{error:.6e}\t{eager_error:.6e}\t{floor:.6e}\t{test}\n")


def compare_with_reference(fast_fn: Callable, ref_fn: Callable, inputs: Sequence, msg: str = "", seed: int = 1):
    """Runs ``fast_fn(*inputs)``, and ``ref_fn`` on the same inputs in float64
    (the reference) and as given (eager PyTorch's error), compares every
    floating-point output, then the gradients of a random weighting of the
    outputs with respect to every input that requires grad.

    ``inputs`` may hold tensors, lists of tensors and other arguments.
    Returns fastmeta's outputs and the float64 reference's.
    """

    def leaves_like(convert):
        def copy(t):
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                return convert(t.detach()).requires_grad_(t.requires_grad)
            return t

        return pytree.tree_map(copy, list(inputs))

    def differentiable(args):
        return [t for t in pytree.tree_leaves(args) if isinstance(t, torch.Tensor) and t.requires_grad]

    ref_inputs, eager_inputs = leaves_like(torch.Tensor.double), leaves_like(torch.Tensor.clone)
    outputs, expected, eager = (
        pytree.tree_leaves(fn(*args))
        for fn, args in ((fast_fn, list(inputs)), (ref_fn, ref_inputs), (ref_fn, eager_inputs))
    )
    assert len(outputs) == len(expected) == len(eager)
    where = f"{msg}: " if msg else ""
    weighted = [[], [], []]
    generator = torch.Generator().manual_seed(seed)
    for i, (o, e, p) in enumerate(zip(outputs, expected, eager)):
        if not o.is_floating_point():
            assert torch.equal(o.cpu(), e.cpu()), f"{where}output {i} differs"
            continue
        assert o.dtype == p.dtype, f"{where}output {i} has dtype {o.dtype}, eager {p.dtype}"
        assert_close_to_reference(o, e, p, f"{where}output {i}")
        weight = torch.randn(e.shape, dtype=torch.float64, generator=generator)
        for terms, t in zip(weighted, (o, e, p)):
            if t.requires_grad:
                terms.append((t * weight.to(t.device, t.dtype)).sum())
    grads = []
    for terms, args in zip(weighted, (list(inputs), ref_inputs, eager_inputs)):
        leaves = differentiable(args)
        if not terms or not leaves:
            return outputs, expected
        found = torch.autograd.grad(sum(terms), leaves, allow_unused=True)
        grads.append([torch.zeros_like(t) if g is None else g for g, t in zip(found, leaves)])
    for i, (g, e, p) in enumerate(zip(*grads)):
        assert_close_to_reference(g, e, p, f"{where}gradient of differentiable input {i}")
    return outputs, expected


def run_until_device_assertion(code: str) -> str:
    """Runs Python ``code`` in a new process and returns its output, which
    must end in a failed CUDA device-side assertion (that ends the process's
    CUDA context, so it cannot run in the test process)."""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "device-side assert" in output, output[-2000:]
    return output
