"""Prototypical networks (Snell et al. 2017)."""

from typing import Optional

import torch
from torch import nn

from .. import ops
from .few_shot import FewShotClassifier

__all__ = ["PrototypicalClassifier", "PrototypicalNetworks"]

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


class PrototypicalClassifier(nn.Module):
    """learn2learn's prototypical head on features: ``fit_(support [S, D],
    labels [S])`` keeps the class means (classes ordered as
    ``torch.unique(labels)``), and ``forward(x [Q, D])`` gives logits ``[Q,
    ways]``: minus the squared Euclidean distance, or with
    ``distance="cosine"`` the cosine similarity (features and prototypes
    normalised). ``distance`` may also be a function ``(prototypes, x) ->
    distances``.

    Args:
        support, labels: fit at construction, if given.
        distance: ``"euclidean"`` (squared, as learn2learn), ``"cosine"`` or a function.
        normalize: scale features and prototypes to unit length first.
    """

    def __init__(self, support=None, labels=None, distance="euclidean", normalize: bool = False):
        super().__init__()
        if distance not in ("euclidean", "cosine") and not callable(distance):
            raise ValueError(
                f"PrototypicalClassifier: distance must be 'euclidean', 'cosine' or a function, got {distance!r}"
            )
        self.distance = distance
        self.normalize = normalize or distance == "cosine"
        self.prototypes: Optional[torch.Tensor] = None
        if support is not None and labels is not None:
            self.fit_(support, labels)

    def _unit(self, x: torch.Tensor) -> torch.Tensor:
        return x / (x.norm(dim=1, keepdim=True) + 1e-8) if self.normalize else x

    def fit_(self, support: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        classes, index = torch.unique(labels, return_inverse=True)
        prototypes = ops.class_prototypes(support.flatten(1), index, len(classes)).view(
            len(classes), *support.shape[1:]
        )
        self.prototypes = self._unit(prototypes)
        return self.prototypes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.prototypes is None:
            raise RuntimeError("PrototypicalClassifier: call fit_(support, labels) before classifying")
        x = self._unit(x)
        if self.distance == "euclidean":
            return -ops.pairwise_distance(x, self.prototypes, "sqeuclidean")
        if self.distance == "cosine":
            return x @ self.prototypes.T
        return -self.distance(self.prototypes, x)
