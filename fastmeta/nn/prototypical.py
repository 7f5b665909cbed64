"""Prototypical networks (Snell et al. 2017)."""

from typing import Optional

import torch
from torch import nn

from .. import ops
from .few_shot import FewShotClassifier

__all__ = ["PrototypicalNetworks"]

METRICS = ("sqeuclidean", "euclidean", "cosine")


class PrototypicalNetworks(FewShotClassifier):
    """Prototypical networks (Snell et al. 2017): each class's prototype is
    the mean of its support features, and a query's score for a class is
    minus its distance to the prototype.

    The prototypes are one fused ``class_prototypes`` call, the scores one
    ``pairwise_distance``, and :meth:`loss` the fused
    ``similarity_cross_entropy`` (the ``[B, Q, ways]`` logits are never
    materialised).

    The default ``metric`` is easyfsl's, the Euclidean distance, so easyfsl
    code gets the same scores; the paper's is the squared Euclidean distance,
    ``metric="sqeuclidean"`` (what ``fastmeta train protonet`` uses).
    ``"cosine"`` scores with the cosine similarity (minus one).

    Args:
        backbone: maps images ``[n, ...]`` to features ``[n, D]``.
        metric: ``"sqeuclidean"``, ``"euclidean"`` or ``"cosine"``.
        use_softmax: ``forward`` returns probabilities instead of scores.
        features: ``feature_centering``, ``feature_normalization``
            (:class:`FewShotClassifier`).

    Example:
        >>> model = PrototypicalNetworks(Conv4(1))
        >>> model.process_support_set(torch.rand(5, 1, 28, 28), torch.arange(5))
        >>> model(torch.rand(3, 1, 28, 28)).shape
        torch.Size([3, 5])
    """

    def __init__(
        self, backbone: Optional[nn.Module] = None, metric: str = "euclidean", use_softmax: bool = False, **features
    ):
        super().__init__(backbone, use_softmax, **features)
        if metric not in METRICS:
            raise ValueError(f"PrototypicalNetworks: metric must be one of {METRICS}, got {metric!r}")
        self.metric = metric

    def prepare_support(self, features: torch.Tensor, labels: torch.Tensor, ways: int) -> torch.Tensor:
        return ops.class_prototypes(features, labels, ways)

    def score_queries(self, prototypes: torch.Tensor, query_features: torch.Tensor) -> torch.Tensor:
        return -ops.pairwise_distance(query_features, prototypes, self.metric)

    def loss(self, support, support_labels, query, query_labels, ways=None) -> torch.Tensor:
        """Cross-entropy of the queries' softmax over minus distances, fused."""
        prototypes, query_features, batched = self.embed_episodes(support, support_labels, query, ways)
        targets = self.batched_query_labels(query_labels, query_features.shape[:2], batched)
        return ops.similarity_cross_entropy(query_features, prototypes, targets, self.metric)
