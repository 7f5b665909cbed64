"""Helpers for fastmeta's tests: devices, dtypes and tolerances."""

import subprocess
import sys

import torch

__all__ = ["DEVICES", "FLOAT_DTYPES", "dtypes_for", "assert_close_to_reference", "randn",
           "run_until_device_assertion"]

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
FLOAT_DTYPES = [torch.float32, torch.float64]
_LOW_PRECISION = [torch.float16, torch.bfloat16]

# Tolerances of a result computed in `dtype` against a float64 reference.
_TOLERANCE = {
    torch.float64: (1e-9, 1e-9),
    torch.float32: (2e-4, 2e-4),
    torch.float16: (2e-2, 2e-2),
    torch.bfloat16: (8e-2, 8e-2),
}


def dtypes_for(device: str):
    """The dtypes with kernels on `device`: low precision on CUDA only."""
    return FLOAT_DTYPES + (_LOW_PRECISION if device == "cuda" else [])


def randn(*shape, dtype=torch.float32, device="cpu", requires_grad=False, generator=None):
    t = torch.randn(*shape, dtype=torch.float64, generator=generator).to(device=device, dtype=dtype)
    return t.requires_grad_(requires_grad)


def assert_close_to_reference(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype,
                              msg: str = ""):
    """Compares a result in `dtype` with a float64 reference, with an absolute
    tolerance relative to the reference's magnitude."""
    rtol, atol = _TOLERANCE[dtype]
    expected = expected.double()
    magnitude = expected.abs().max().item() if expected.numel() else 1.0
    torch.testing.assert_close(actual.double().cpu(), expected.cpu(), rtol=rtol,
                               atol=atol * max(1.0, magnitude), equal_nan=True, msg=msg or None)


def run_until_device_assertion(code: str) -> str:
    """Runs Python ``code`` in a new process and returns its output, which
    must end in a failed CUDA device-side assertion (that ends the process's
    CUDA context, so it cannot run in the test process)."""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "device-side assert" in output, output[-2000:]
    return output
