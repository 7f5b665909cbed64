"""What every metric-based few-shot classifier shares: the backbone call, the
stored support set, the shapes of scores, and the batched episode form."""

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from .._checks import check_integer_labels

__all__ = ["FewShotClassifier"]


class FewShotClassifier(nn.Module):
    """Base of the metric-based methods, with easyfsl's interface and a
    batched one.

    easyfsl's: ``process_support_set(support_images, support_labels)`` embeds
    and stores one episode's support set (labels in ``0..ways-1``), then
    ``forward(query_images)`` returns scores ``[Q, ways]``.

    Batched: ``score_episodes(support [B, S, ...], support_labels [B, S],
    query [B, Q, ...])`` returns scores ``[B, Q, ways]`` for B episodes at
    once, and ``loss(...)`` the method's training loss; unbatched episodes
    (``[S, ...]``, ``[S]``, ``[Q, ...]``) are accepted too. The backbone
    embeds each episode's support set, then its query set, in separate calls
    as easyfsl does, so batch norm statistics are per episode and the batched
    form equals running the episodes one by one (and an episode's images stay
    in the CPU's caches, which one call on all images of many episodes does
    not on a small CPU). Set ``episodes_per_call`` to embed more
    episodes per call (None: all; batch norm statistics then span them), the
    faster choice on a GPU.

    A method implements ``prepare_support`` (support features ``[B, S, ...]``
    and int64 labels to whatever it keeps, e.g. prototypes) and ``score_queries``,
    and its training loss in ``loss_of_scores`` (or ``loss``, where the loss
    does not go through the scores).

    Args:
        backbone: maps images ``[n, ...]`` to features (None: the identity,
            for features computed beforehand).
        use_softmax: ``forward`` and ``score_episodes`` return probabilities.
        feature_centering: subtracted from every feature vector (e.g. the
            mean feature of the training classes, as in SimpleShot).
        feature_normalization: the ``p`` of the norm each centred feature is
            scaled to unit length in (None: no normalisation).
    """

    #: dimensions of one image's features: 1 (vectors) or 3 (feature maps)
    feature_dims = 1
    #: episodes whose support (or query) images go through the backbone (and,
    #: for relation networks, whose pairs go through the relation module) in one call
    episodes_per_call: Optional[int] = 1

    def __init__(
        self,
        backbone: Optional[nn.Module] = None,
        use_softmax: bool = False,
        feature_centering: Optional[torch.Tensor] = None,
        feature_normalization: Optional[float] = None,
    ):
        super().__init__()
        self.backbone = backbone if backbone is not None else nn.Identity()
        self.use_softmax = use_softmax
        # Moves with the module, stays out of its state dict (as in easyfsl's).
        centering = None if feature_centering is None else torch.as_tensor(feature_centering)
        self.register_buffer("feature_centering", centering, persistent=False)
        self.feature_normalization = feature_normalization
        self.support_state: Any = None
        self.support_features = torch.tensor(())
        self.support_labels = torch.tensor((), dtype=torch.long)
        self.prototypes = torch.tensor(())

    @staticmethod
    def is_transductive() -> bool:
        """Whether the method's scores of a query depend on the other queries."""
        return False

    def prepare_support(self, features: torch.Tensor, labels: torch.Tensor, ways: int) -> Any:
        raise NotImplementedError

    def score_queries(self, support_state: Any, query_features: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def compute_features(self, images: torch.Tensor) -> torch.Tensor:
        """The backbone's features of ``images [n, ...]``, checked to be one
        flat vector per image (or one feature map, for relation networks),
        minus ``feature_centering`` and then normalised to unit
        ``feature_normalization``-norm along dimension 1, where given."""
        features = self.backbone(images)
        if features.dim() != 1 + self.feature_dims:
            expected = (
                "one flat feature vector per image, [n, D]"
                if self.feature_dims == 1
                else "one feature map per image, [n, C, h, w]"
            )
            raise ValueError(
                f"{type(self).__name__}: the backbone must return {expected}; got shape {list(features.shape)}"
            )
        if self.feature_centering is not None:
            features = features - self.feature_centering
        if self.feature_normalization is not None:
            features = F.normalize(features, p=self.feature_normalization, dim=1)
        return features

    def process_support_set(self, support_images: torch.Tensor, support_labels: torch.Tensor):
        """Embeds one episode's support set ``[S, ...]`` with labels ``[S]`` in
        ``0..ways-1`` (every class present) and keeps what ``forward`` needs,
        and, as easyfsl does, ``support_features``, ``support_labels`` and the
        class means ``prototypes [ways, ...]``."""
        labels = torch.as_tensor(support_labels, device=support_images.device)
        if labels.dim() != 1 or labels.shape[0] != support_images.shape[0]:
            raise ValueError(
                f"{type(self).__name__}: support_labels must have shape "
                f"[{support_images.shape[0]}], got {list(labels.shape)}"
            )
        ways = self._ways(labels[None], None)
        features = self.compute_features(support_images)
        self.support_features, self.support_labels = features, labels
        indices = labels.long()
        self.prototypes = ops.class_prototypes(features.flatten(1), indices, ways).view(ways, *features.shape[1:])
        self.support_state = self.prepare_support(features[None], indices[None], ways)

    def forward(self, query_images: torch.Tensor) -> torch.Tensor:
        """Scores ``[Q, ways]`` of ``query_images [Q, ...]`` against the support
        set given to :meth:`process_support_set`."""
        if type(self).score_queries is FewShotClassifier.score_queries:
            raise NotImplementedError(
                f"{type(self).__name__} scores no queries: a few-shot classifier implements "
                "prepare_support and score_queries (or forward)"
            )
        if self.support_state is None:
            raise RuntimeError(
                f"{type(self).__name__}: call process_support_set(support_images, "
                "support_labels) before forward(query_images)"
            )
        return self.softmax_if_specified(
            self.score_queries(self.support_state, self.compute_features(query_images)[None])[0]
        )

    def softmax_if_specified(self, scores: torch.Tensor) -> torch.Tensor:
        """The scores, or with ``use_softmax`` their softmax over classes."""
        return scores.softmax(-1) if self.use_softmax else scores

    def score_episodes(
        self, support: torch.Tensor, support_labels: torch.Tensor, query: torch.Tensor, ways: Optional[int] = None
    ) -> torch.Tensor:
        """Scores ``[B, Q, ways]`` of B episodes (``[Q, ways]`` for one
        unbatched episode). ``ways`` defaults to the largest label + 1."""
        state, query_features, batched = self.embed_episodes(support, support_labels, query, ways)
        scores = self.softmax_if_specified(self.score_queries(state, query_features))
        return scores if batched else scores[0]

    def loss(
        self,
        support: torch.Tensor,
        support_labels: torch.Tensor,
        query: torch.Tensor,
        query_labels: torch.Tensor,
        ways: Optional[int] = None,
    ) -> torch.Tensor:
        """The method's training loss over the queries of the episodes:
        :meth:`loss_of_scores` of their scores."""
        state, query_features, batched = self.embed_episodes(support, support_labels, query, ways)
        scores = self.score_queries(state, query_features)
        return self.loss_of_scores(scores, self.batched_query_labels(query_labels, scores.shape[:-1], batched))

    def loss_of_scores(self, scores: torch.Tensor, query_labels: torch.Tensor) -> torch.Tensor:
        """The loss of scores ``[B, Q, ways]`` for labels ``[B, Q]``: here
        their cross-entropy, averaged over the queries."""
        return F.cross_entropy(scores.flatten(0, 1), query_labels.flatten())

    def embed_episodes(
        self, support: torch.Tensor, support_labels: torch.Tensor, query: torch.Tensor, ways: Optional[int] = None
    ):
        """``(support state, query features [B, Q, ...], batched)``: the
        episodes checked, embedded by the backbone, and the support prepared."""
        batched = self._check_episode(support, support_labels, query)
        if not batched:
            support, support_labels, query = support[None], support_labels[None], query[None]
        state = self.prepare_support(self._embed(support), support_labels.long(), self._ways(support_labels, ways))
        return state, self._embed(query), batched

    def batched_query_labels(self, query_labels: torch.Tensor, shape, batched: bool) -> torch.Tensor:
        """``query_labels`` checked against the queries' shape ``[B, Q]``, batched, as int64."""
        query_labels = query_labels if batched else query_labels[None]
        if tuple(query_labels.shape) != tuple(shape):
            raise ValueError(
                f"{type(self).__name__}: query_labels must have shape "
                f"{list(shape) if batched else list(shape[1:])}, got "
                f"{list(query_labels.shape if batched else query_labels.shape[1:])}"
            )
        check_integer_labels(type(self).__name__, "query_labels", query_labels)
        return query_labels.long()

    def _embed(self, images: torch.Tensor) -> torch.Tensor:
        def embed(part):
            return self.compute_features(part.flatten(0, 1)).unflatten(0, part.shape[:2])

        if type(self.backbone) is nn.Identity:
            return embed(images)  # features given: one call, not one per episode (and its slices)
        return self.per_episode_chunk(embed, images)

    def per_episode_chunk(self, function, *episodes: torch.Tensor) -> torch.Tensor:
        """``function`` applied to ``episodes_per_call`` episodes at a time."""
        B = episodes[0].shape[0]
        chunk = self.episodes_per_call or max(B, 1)
        parts = [function(*(e[i : i + chunk] for e in episodes)) for i in range(0, max(B, 1), chunk)]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _check_episode(self, support, support_labels, query) -> bool:
        name = type(self).__name__
        batched = support_labels.dim() == 2
        if support_labels.dim() not in (1, 2):
            raise ValueError(f"{name}: support_labels must be [B, S] (or [S]), got shape {list(support_labels.shape)}")
        if tuple(support.shape[: support_labels.dim()]) != tuple(support_labels.shape):
            raise ValueError(
                f"{name}: support {list(support.shape)} and support_labels "
                f"{list(support_labels.shape)} disagree on the episode shape"
            )
        if batched and query.shape[0] != support.shape[0]:
            raise ValueError(f"{name}: query has {query.shape[0]} episodes, support {support.shape[0]}")
        if query.shape[support_labels.dim() :] != support.shape[support_labels.dim() :]:
            raise ValueError(
                f"{name}: query images {list(query.shape)} and support images {list(support.shape)} differ in shape"
            )
        return batched

    def check_built_for(self, ways: Optional[int], features: torch.Tensor, what: str = "features"):
        """For a model built for ``self.ways`` classes of
        ``self.feature_dimension`` features (FewShotGNN, MetaNetwork): the
        episodes' ``ways`` (None: not checked) and the features' last size."""
        name = type(self).__name__
        if ways is not None and ways != self.ways:
            raise ValueError(f"{name}: the model was built for ways = {self.ways}, got episodes of {ways} classes")
        if features.shape[-1] != self.feature_dimension:
            raise ValueError(
                f"{name}: the backbone gives {features.shape[-1]} {what}, but "
                f"feature_dimension is {self.feature_dimension}"
            )

    def _ways(self, labels: torch.Tensor, ways: Optional[int]) -> int:
        """Checks episode labels ``[B, S]``: integers in ``0..ways-1``, every
        class present in every episode."""
        name = type(self).__name__
        check_integer_labels(name, "support_labels", labels)
        if labels.shape[0] == 0:  # no episodes: nothing to check, empty results
            return 0 if ways is None else ways
        if labels.numel() == 0:
            raise ValueError(f"{name}: the support set is empty")
        low, high = (int(v) for v in labels.aminmax())
        ways = high + 1 if ways is None else ways
        if low < 0 or high >= ways:
            raise ValueError(
                f"{name}: support_labels must lie in 0..{ways - 1} (labels "
                f"remapped per episode), got values in {low}..{high}"
            )
        counts = torch.zeros(labels.shape[0], ways, dtype=torch.long, device=labels.device)
        counts.scatter_add_(1, labels.long(), torch.ones_like(labels, dtype=torch.long))
        if bool((counts == 0).any()):
            raise ValueError(
                f"{name}: every class 0..{ways - 1} needs at least one support "
                "example in every episode; some class has none"
            )
        return ways
