"""Siamese networks for one-shot classification (Koch et al. 2015)."""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from .few_shot import FewShotClassifier

__all__ = ["SiameseNetworks"]

HEADS = ("koch", "contrastive")


class SiameseNetworks(FewShotClassifier):
    """Siamese networks: twin embeddings compared by a verification head, and
    one-shot classification of a query by its best-scoring support example.

    Heads:
        ``"koch"`` (Koch et al. 2015): the logit of "same class" is a learned
        weighted L1 distance, ``sum_j alpha_j |f(x1)_j - f(x2)_j| + b``,
        trained with binary cross-entropy (its sigmoid is the paper's
        probability).
        ``"contrastive"`` (Hadsell et al. 2006): the score is minus the
        Euclidean distance, trained with the fused ``contrastive_loss``
        (``same d^2 + (1 - same) max(margin - d, 0)^2``).

    ``forward`` and ``score_episodes`` give each class the best score among
    its support examples. :meth:`loss` is the verification loss over every
    (query, support) pair of the episodes; :meth:`verification_loss` the
    same on given pairs of images.

    Example:
        >>> model = SiameseNetworks(Conv4(1), head="koch", feature_dimension=64)
        >>> model.process_support_set(torch.rand(5, 1, 28, 28), torch.arange(5))
        >>> model(torch.rand(3, 1, 28, 28)).shape
        torch.Size([3, 5])
    """

    def __init__(
        self,
        backbone: Optional[nn.Module] = None,
        head: str = "koch",
        *,
        feature_dimension: Optional[int] = None,
        margin: float = 1.0,
        use_softmax: bool = False,
        **features,
    ):
        super().__init__(backbone, use_softmax, **features)
        if head not in HEADS:
            raise ValueError(f"SiameseNetworks: head must be one of {HEADS}, got {head!r}")
        if head == "koch" and feature_dimension is None:
            raise ValueError("SiameseNetworks: the koch head needs feature_dimension")
        self.head, self.margin = head, margin
        self.verifier = nn.Linear(feature_dimension, 1) if head == "koch" else None

    def pair_scores(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Verification scores ``[B, Q, S]`` of every pair of ``x [B, Q, D]``
        and ``y [B, S, D]``: Koch's logit, or minus the Euclidean distance."""
        if self.head == "koch":
            return self.verifier((x[:, :, None] - y[:, None]).abs()).squeeze(-1)
        return -ops.pairwise_distance(x, y, "euclidean")

    def prepare_support(self, features: torch.Tensor, labels: torch.Tensor, ways: int):
        return features, labels, ways

    def score_queries(self, support_state, query_features: torch.Tensor) -> torch.Tensor:
        support, labels, ways = support_state
        pairs = self.pair_scores(query_features, support)
        B, Q, S = pairs.shape
        best = pairs.new_full((B, Q, ways), float("-inf"))
        return best.scatter_reduce(2, labels[:, None].expand(B, Q, S).long(), pairs, "amax")

    def loss(self, support, support_labels, query, query_labels, ways=None) -> torch.Tensor:
        """Verification loss over every (query, support) pair of the episodes."""
        (support_features, labels, ways), query_features, batched = self.embed_episodes(
            support, support_labels, query, ways
        )
        targets = self.batched_query_labels(query_labels, query_features.shape[:2], batched)
        if targets.numel():
            low, high = (int(v) for v in targets.aminmax())
            if low < 0 or high >= ways:
                raise ValueError(
                    f"SiameseNetworks: query_labels must lie in 0..{ways - 1}, got values in {low}..{high}"
                )
        same = (targets[:, :, None] == labels[:, None]).to(query_features.dtype)
        B, Q, S = same.shape
        return self._verification(
            query_features[:, :, None].expand(B, Q, S, -1), support_features[:, None].expand(B, Q, S, -1), same
        )

    def verification_loss(self, images1: torch.Tensor, images2: torch.Tensor, same: torch.Tensor) -> torch.Tensor:
        """The head's loss on pairs of images ``[n, ...]`` with ``same [n]``
        (1 for pairs of one class, 0 otherwise)."""
        if images1.shape != images2.shape or same.shape != images1.shape[:1]:
            raise ValueError(
                f"SiameseNetworks: images1 {list(images1.shape)}, images2 "
                f"{list(images2.shape)} and same {list(same.shape)} must pair up"
            )
        features = self.compute_features(torch.cat([images1, images2]))
        first, second = features.chunk(2)
        return self._verification(first, second, same.to(features.dtype))

    def _verification(self, x: torch.Tensor, y: torch.Tensor, same: torch.Tensor) -> torch.Tensor:
        if self.head == "koch":
            return F.binary_cross_entropy_with_logits(self.verifier((x - y).abs()).squeeze(-1), same)
        D = x.shape[-1]
        return ops.contrastive_loss(x.reshape(-1, D), y.reshape(-1, D), same.reshape(-1), self.margin)
