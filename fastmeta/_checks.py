"""Argument checks shared by fastmeta's subpackages (ops, nn, data,
algorithms); it imports nothing of fastmeta."""

from typing import Sequence

import torch


def check_integer_labels(owner: str, name: str, labels: torch.Tensor):
    """Class labels must have an integer dtype (not floating, complex or bool)."""
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"{owner}: {name} must be integers, got {labels.dtype}")


def check_choice(op: str, name: str, value: str, choices: Sequence[str]):
    if value not in choices:
        raise ValueError(f"{op}: unknown {name} {value!r}; expected one of {', '.join(map(repr, choices))}")
