"""Plain-PyTorch versions of every fastmeta op, module and algorithm, with the
same signatures: the oracle the tests compare against and the eager baseline
of the benchmarks. The op formulas live in :mod:`fastmeta.formulas`, the
model-level baselines in :mod:`fastmeta.bench.baselines`; both are
re-exported here.
"""

from .bench.baselines import *  # noqa: F401,F403
from .bench.baselines import __all__ as _baselines
from .formulas import *  # noqa: F401,F403
from .formulas import __all__ as _formulas

__all__ = _formulas + _baselines
