"""Benchmarks: ``fastmeta bench`` and the pytest-benchmark files share these cases."""

from .cases import CASES, Variant, build
from .runner import format_table, run, time_callable

__all__ = ["CASES", "Variant", "build", "run", "format_table", "time_callable"]
