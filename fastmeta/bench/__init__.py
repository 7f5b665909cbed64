"""Benchmarks: ``fastmeta bench`` and the pytest-benchmark files share these cases."""

from .cases import CASES, Variant, build
from .runner import format_header, format_row, run, time_callable, time_callables

__all__ = ["CASES", "Variant", "build", "run", "format_header", "format_row", "time_callable",
           "time_callables"]
