"""pytest-benchmark view of the cases of ``fastmeta bench`` (fastmeta/bench/cases.py).

Run with ``.venv/bin/python -m pytest benchmarks`` (add ``--benchmark-json PATH``
to save); on a GPU machine the cases run on CUDA.
"""

import pytest
import torch

from fastmeta.bench.cases import CASES

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def contenders():
    for case in CASES:
        for variant in CASES[case](DEVICE):
            yield pytest.param(variant.fastmeta, id=f"{case}[{variant.label}]-fastmeta")
            for name, fn in variant.baselines.items():
                yield pytest.param(fn, id=f"{case}[{variant.label}]-{name}")


@pytest.mark.parametrize("fn", contenders())
def test_case(benchmark, fn):
    def step():
        fn()
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    benchmark.pedantic(step, warmup_rounds=2, rounds=5)
