"""Benchmarks: ``fastmeta bench`` and the pytest-benchmark files share the
cases of :mod:`fastmeta.bench.cases`, timed by :mod:`fastmeta.bench.runner`
against the baselines of :mod:`fastmeta.bench.baselines` and
:mod:`fastmeta.formulas`."""
