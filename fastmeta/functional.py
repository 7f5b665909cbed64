"""Batched Hessian-vector products and the meta-gradient engine of
second-order MAML, under their public names. The engine lives with the
algorithms it serves, in :mod:`fastmeta.algorithms.engine`."""

from .algorithms.engine import (  # noqa: F401
    _loss_fn,
    batched_hvp,
    flat_to_dict,
    maml_query_loss,
    mlp_derivatives,
    mlp_structure,
    module_derivatives,
    task_derivatives,
)

__all__ = [
    "batched_hvp",
    "maml_query_loss",
    "mlp_derivatives",
    "module_derivatives",
    "mlp_structure",
    "flat_to_dict",
    "task_derivatives",
]
