"""Meta Networks (Munkhdalai & Yu 2017)."""

import numbers
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..formulas import log_sign_preprocess
from .few_shot import FewShotClassifier

__all__ = ["MetaNetwork"]


def coordinatewise_learner(hidden: int) -> nn.Sequential:
    """A meta-learner applied to every coordinate of a gradient: its
    log/sign-preprocessed value (2 features) to one fast-weight value."""
    net = nn.Sequential(nn.Linear(2, hidden), nn.ReLU(), nn.Linear(hidden, 1))
    nn.init.normal_(net[2].weight, std=0.01)
    nn.init.zeros_(net[2].bias)
    return net


class MetaNetwork(FewShotClassifier):
    """Meta Networks (Munkhdalai & Yu 2017): fast weights generated from
    loss gradients, on top of the backbone's features.

    Two networks have slow weights (trained across tasks) and fast weights
    (generated per task or per example), combined by layer augmentation:
    ``act(slow x) + act(fast x)``.

    - The embedding network ``u`` (one layer to ``key_dimension``) gets
      task-level fast weights: the meta-learner ``d`` maps, coordinate by
      coordinate, the gradient of a representation loss on the support set
      (prototype cross-entropy of its embeddings) to fast weights.
    - The base learner ``b`` (two layers, ``hidden`` units, ``ways``
      outputs) gets example-level fast weights: the meta-learner ``m`` maps
      each support example's loss gradient to fast weights, stored with the
      example's embedding as key.
    - A query reads its fast weights by cosine attention over those keys
      (:func:`fastmeta.ops.attention_readout`, fused) and classifies with
      ``b`` under slow plus read fast weights.

    The gradients are the meta-learners' inputs, computed batched over
    examples and episodes and not differentiated through (as the paper's
    meta information). Differs from the paper: ``u`` and ``b`` are small
    networks on a shared backbone's features (the paper gives each its own
    convnet, with fast weights in every layer), and ``d`` is an MLP like
    ``m`` (the paper's is an LSTM).

    Args:
        backbone: maps images ``[n, ...]`` to features ``[n, feature_dimension]``.
        feature_dimension: the backbone's features per image.
        ways: classes per episode.
        hidden: the base learner's hidden units.
        key_dimension: the embedding network's output size.
        meta_hidden: hidden units of the coordinatewise meta-learners.

    Example:
        >>> model = MetaNetwork(Conv4(1), feature_dimension=64, ways=5)
        >>> scores = model.score_episodes(torch.rand(2, 5, 1, 28, 28), torch.arange(5).repeat(2, 1),
        ...                               torch.rand(2, 3, 1, 28, 28))
        >>> scores.shape
        torch.Size([2, 3, 5])
    """

    def __init__(
        self,
        backbone: Optional[nn.Module] = None,
        feature_dimension: int = 64,
        ways: int = 5,
        hidden: int = 64,
        key_dimension: int = 64,
        meta_hidden: int = 20,
        use_softmax: bool = False,
        **features,
    ):
        super().__init__(backbone, use_softmax, **features)
        for name, value in (
            ("feature_dimension", feature_dimension),
            ("ways", ways),
            ("hidden", hidden),
            ("key_dimension", key_dimension),
            ("meta_hidden", meta_hidden),
        ):
            if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
                raise ValueError(f"MetaNetwork: {name} must be a positive integer, got {value!r}")
        feature_dimension, ways, hidden = int(feature_dimension), int(ways), int(hidden)
        key_dimension, meta_hidden = int(key_dimension), int(meta_hidden)
        self.feature_dimension, self.ways = feature_dimension, ways
        self.embedding = nn.Linear(feature_dimension, key_dimension)  # u's slow weights
        self.base_hidden = nn.Linear(feature_dimension, hidden)  # b's slow weights
        self.base_out = nn.Linear(hidden, ways)
        self.task_learner = coordinatewise_learner(meta_hidden)  # d
        self.example_learner = coordinatewise_learner(meta_hidden)  # m

    def fast_weights(self, learner: nn.Module, grad: torch.Tensor) -> torch.Tensor:
        return learner(log_sign_preprocess(grad)).squeeze(-1)

    def embed(self, features: torch.Tensor, fast: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``u``: ``relu(Q x + q) + relu(Q* x)``, with per-episode fast
        weights ``fast [B, K, D]`` (none: slow weights only)."""
        keys = F.relu(self.embedding(features))
        return keys if fast is None else keys + F.relu(features @ fast.transpose(1, 2))

    def base_logits(
        self,
        features: torch.Tensor,
        hidden_weight: torch.Tensor,
        out_weight: torch.Tensor,
        fast_hidden: Optional[torch.Tensor] = None,
        fast_out: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """``b`` on features ``[B, N, D]`` with weights of shape ``[H, D]``
        and ``[C, H]``, or one per row (``[B, N, H, D]``, ``[B, N, C, H]``),
        plus optional per-row fast weights."""

        def linear(x, w):
            return x @ w.T if w.dim() == 2 else torch.einsum("bnd,bnhd->bnh", x, w)

        units = F.relu(linear(features, hidden_weight) + self.base_hidden.bias)
        if fast_hidden is not None:
            units = units + F.relu(linear(features, fast_hidden))
        logits = linear(units, out_weight) + self.base_out.bias
        return logits if fast_out is None else logits + linear(units, fast_out)

    def task_gradient(self, features: torch.Tensor, labels: torch.Tensor, ways: int) -> torch.Tensor:
        """Each episode's gradient ``[B, K, D]`` of the representation loss
        (cross-entropy of minus squared distances to the class means of the
        support embeddings) with respect to ``u``'s slow weight."""
        B = features.shape[0]
        weight = self.embedding.weight.detach().expand(B, -1, -1).clone().requires_grad_()
        with torch.enable_grad():
            keys = F.relu(features.detach() @ weight.transpose(1, 2) + self.embedding.bias.detach())
            means = ops.class_prototypes(keys, labels, ways)
            logits = -(torch.cdist(keys, means) ** 2)
            loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum")
            return torch.autograd.grad(loss, weight)[0]

    def example_gradients(self, features: torch.Tensor, labels: torch.Tensor):
        """Each support example's gradient of ``b``'s cross-entropy with
        respect to its slow weights: ``[B, S, H, D]`` and ``[B, S, C, H]``."""
        B, S = labels.shape
        hidden = self.base_hidden.weight.detach().expand(B, S, -1, -1).clone().requires_grad_()
        out = self.base_out.weight.detach().expand(B, S, -1, -1).clone().requires_grad_()
        with torch.enable_grad():
            logits = self.base_logits(features.detach(), hidden, out)
            loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten().long(), reduction="sum")
            return torch.autograd.grad(loss, (hidden, out))

    def prepare_support(self, features: torch.Tensor, labels: torch.Tensor, ways: int):
        self.check_built_for(ways, features)
        task_fast = self.fast_weights(self.task_learner, self.task_gradient(features, labels, ways))
        keys = self.embed(features, task_fast)
        grad_hidden, grad_out = self.example_gradients(features, labels)
        values = torch.cat(
            [
                self.fast_weights(self.example_learner, grad_hidden).flatten(2),
                self.fast_weights(self.example_learner, grad_out).flatten(2),
            ],
            -1,
        )
        return task_fast, keys, values

    def score_queries(self, state, query_features: torch.Tensor) -> torch.Tensor:
        task_fast, keys, values = state
        B, Q, D = query_features.shape
        fast = ops.attention_readout(self.embed(query_features, task_fast), keys, values, "cosine")
        H = self.base_hidden.out_features
        fast_hidden = fast[..., : H * D].unflatten(-1, (H, D))
        fast_out = fast[..., H * D :].unflatten(-1, (self.ways, H))
        return self.base_logits(query_features, self.base_hidden.weight, self.base_out.weight, fast_hidden, fast_out)
