"""Relation networks (Sung et al. 2018) with a separable first relation layer."""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from .batch_norm_updates import blend_running_statistics
from .few_shot import FewShotClassifier

__all__ = ["RelationModule", "RelationNetworks", "easyfsl_relation_module", "separable_batch_norm"]


class RelationModule(nn.Module):
    """Sung et al.'s relation module: on the concatenation ``[prototype map,
    query map]`` (``2 C`` channels), two blocks of 3x3 convolution, batch
    norm, ReLU and max-pooling (the second pooling global, so any map size
    works), then ``C -> hidden_units`` ReLU ``-> 1`` sigmoid: a relation
    score in (0, 1).

    ``forward(pairs [n, 2C, h, w])`` is the concatenation form;
    :meth:`pair_scores` gives every (query, prototype) pair's score without
    building the concatenations: the first convolution is linear, so it is
    applied once to the N prototype maps (its first ``C`` input channels) and
    once to the Q query maps (the other ``C``) and the two halves are added
    per pair: N + Q maps through the largest convolution instead of N x Q.
    """

    def __init__(self, feature_channels: int, hidden_units: int = 8):
        super().__init__()
        C = feature_channels
        self.first = nn.Conv2d(2 * C, C, 3, padding=1)
        self.rest = nn.Sequential(
            nn.BatchNorm2d(C),
            nn.ReLU(),
            nn.MaxPool2d(2, ceil_mode=True),
            nn.Conv2d(C, C, 3, padding=1),
            nn.BatchNorm2d(C),
            nn.ReLU(),
            nn.AdaptiveMaxPool2d(1),
            nn.Flatten(),
            nn.Linear(C, hidden_units),
            nn.ReLU(),
            nn.Linear(hidden_units, 1),
            nn.Sigmoid(),
        )

    def forward(self, pairs: torch.Tensor) -> torch.Tensor:
        return self.rest(self.first(pairs)).squeeze(-1)

    def pair_scores(self, prototypes: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        """Scores ``[B, Q, N]`` of ``queries [B, Q, C, h, w]`` against
        ``prototypes [B, N, C, h, w]``, equal to ``forward`` on every pair.

        The batch norm that follows the first convolution is separable too:
        its statistics over all pairs follow from the two halves' (a pair's
        mean is the sum of the halves' means; its variance adds the halves'
        variances and their per-position covariance of episode means), and
        normalising a sum is the sum of the halves shifted and scaled. The
        ReLU and max-pooling that follow take each pair's sum of halves in one
        op (:func:`fastmeta.ops.relation_pair_pool`), so the N x Q pair maps
        are only built pooled, channels last (convolving them is several times
        faster so on the CPU)."""
        B, N, C = prototypes.shape[:3]
        Q = queries.shape[1]
        conv = self.first
        prototype_half = F.conv2d(
            prototypes.flatten(0, 1), conv.weight[:, :C], conv.bias, conv.stride, conv.padding, conv.dilation
        ).unflatten(0, (B, N))
        query_half = F.conv2d(
            queries.flatten(0, 1), conv.weight[:, C:], None, conv.stride, conv.padding, conv.dilation
        ).unflatten(0, (B, Q))
        rest = self.rest
        if isinstance(rest[0], nn.BatchNorm2d) and B and Q and N:
            query_half, prototype_half = separable_batch_norm(rest[0], query_half, prototype_half)
            rest = rest[1:]
        channels_last = (0, 1, 3, 4, 2)
        query_half = query_half.permute(channels_last)
        prototype_half = prototype_half.permute(channels_last)
        if _is_relu_pool(rest[:2]):
            pairs = ops.relation_pair_pool(query_half, prototype_half)  # [B, Q, N, h', w', C]
            rest = rest[2:]
        else:
            pairs = query_half[:, :, None] + prototype_half[:, None]  # [B, Q, N, h, w, C]
        return rest(pairs.flatten(0, 2).permute(0, 3, 1, 2)).view(B, Q, N)


def _is_relu_pool(layers: nn.Sequential) -> bool:
    """Whether ``layers`` are a ReLU and a 2x2 max-pooling with ceil mode,
    the block :func:`fastmeta.ops.relation_pair_pool` fuses."""
    if len(layers) < 2 or not isinstance(layers[0], nn.ReLU) or not isinstance(layers[1], nn.MaxPool2d):
        return False
    pool = layers[1]
    window = [pool.kernel_size, pool.stride, pool.padding, pool.dilation]
    window = [v if isinstance(v, tuple) else (v, v) for v in window]
    return window == [(2, 2), (2, 2), (0, 0), (1, 1)] and pool.ceil_mode and not pool.return_indices


def separable_batch_norm(norm: nn.BatchNorm2d, queries: torch.Tensor, prototypes: torch.Tensor):
    """``(a, b)`` such that ``a[:, i] + b[:, j]`` is ``norm`` applied to the
    maps ``queries[:, i] + prototypes[:, j]`` of every pair of each episode
    (``[B, Q, C, h, w]`` and ``[B, N, C, h, w]``), statistics and running
    statistics included, without building the pairs."""
    B, Q, C, h, w = queries.shape
    N = prototypes.shape[1]
    channel = (1, 1, C, 1, 1)
    if norm.training or not norm.track_running_stats:
        count = B * Q * N * h * w
        if count <= 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got {count} relation pairs")
        query_mean = queries.mean((0, 1, 3, 4))
        prototype_mean = prototypes.mean((0, 1, 3, 4))
        centred_queries = queries - query_mean.view(channel)
        centred_prototypes = prototypes - prototype_mean.view(channel)
        covariance = (centred_queries.mean(1) * centred_prototypes.mean(1)).mean((0, 2, 3))
        mean = query_mean + prototype_mean
        variance = (
            centred_queries.square().mean((0, 1, 3, 4))
            + centred_prototypes.square().mean((0, 1, 3, 4))
            + 2 * covariance
        )
        if norm.training and norm.track_running_stats:
            blend_running_statistics(norm, mean, variance * count / (count - 1))
    else:
        mean, variance = norm.running_mean, norm.running_var
    scale = torch.rsqrt(variance + norm.eps)
    if norm.affine:
        scale = scale * norm.weight
    shift = norm.bias if norm.affine else torch.zeros_like(scale)
    return (
        (queries - mean.view(channel)) * scale.view(channel),
        prototypes * scale.view(channel) + shift.view(channel),
    )


class RelationNetworks(FewShotClassifier):
    """Relation networks (Sung et al. 2018): a learned relation module scores
    each (class prototype, query) pair of feature maps; prototypes are the
    class means of the support maps (sums in the paper; equal for 1 shot).
    Trained with the mean squared error to the one-hot labels (:meth:`loss`).

    With the default :class:`RelationModule` the first relation layer is
    separable (see :meth:`RelationModule.pair_scores`); any other
    ``relation_module`` gets the concatenation of every pair, as easyfsl.
    easyfsl's default relation module is another network (adaptive pooling
    to 5x5, an unpadded second convolution): build the model with
    ``relation_module=easyfsl_relation_module(C)`` to load easyfsl's state
    dicts and get its scores.

    Args:
        backbone: maps images to feature maps ``[n, C, h, w]`` (e.g.
            ``Conv4(1, pooled_blocks=2, flatten=False)``).
        feature_dimension: ``C``.
        relation_module: maps pairs ``[n, 2C, h, w]`` to scores ``[n]``.

    Example:
        >>> model = RelationNetworks(Conv4(1, pooled_blocks=2, flatten=False), feature_dimension=64)
        >>> model.process_support_set(torch.rand(5, 1, 28, 28), torch.arange(5))
        >>> model(torch.rand(3, 1, 28, 28)).shape
        torch.Size([3, 5])
    """

    feature_dims = 3

    def __init__(
        self,
        backbone: Optional[nn.Module] = None,
        *,
        feature_dimension: int,
        relation_module: Optional[nn.Module] = None,
        use_softmax: bool = False,
        **features,
    ):
        super().__init__(backbone, use_softmax, **features)
        self.feature_dimension = feature_dimension
        self.relation_module = relation_module or RelationModule(feature_dimension)
        self.register_load_state_dict_pre_hook(_explain_easyfsl_relation_module)

    def prepare_support(self, features: torch.Tensor, labels: torch.Tensor, ways: int) -> torch.Tensor:
        if features.shape[2] != self.feature_dimension:
            raise ValueError(
                f"RelationNetworks: the backbone returns {features.shape[2]} channels, "
                f"feature_dimension is {self.feature_dimension}"
            )
        prototypes = ops.class_prototypes(features.flatten(2), labels, ways)
        return prototypes.unflatten(2, features.shape[2:])

    def score_queries(self, prototypes: torch.Tensor, query_features: torch.Tensor) -> torch.Tensor:
        return self.per_episode_chunk(self._relate, prototypes, query_features)

    def _relate(self, prototypes: torch.Tensor, query_features: torch.Tensor) -> torch.Tensor:
        if isinstance(self.relation_module, RelationModule):
            return self.relation_module.pair_scores(prototypes, query_features)
        B, Q, N = query_features.shape[0], query_features.shape[1], prototypes.shape[1]
        pairs = torch.cat(
            [
                prototypes[:, None].expand(B, Q, *prototypes.shape[1:]),
                query_features[:, :, None].expand(B, Q, N, *query_features.shape[2:]),
            ],
            3,
        )
        return self.relation_module(pairs.flatten(0, 2)).view(B, Q, N)

    def loss_of_scores(self, scores: torch.Tensor, query_labels: torch.Tensor) -> torch.Tensor:
        """Mean squared error of the relation scores to the one-hot labels."""
        return F.mse_loss(scores, F.one_hot(query_labels.long(), scores.shape[-1]).to(scores.dtype))


def easyfsl_relation_module(feature_dimension: int, inner_channels: int = 8) -> nn.Module:
    """easyfsl's default relation module, with its parameter names: two
    blocks of 3x3 convolution (the second unpadded), batch norm (momentum 1)
    and ReLU, adaptively max-pooled to 5x5 and then to 1x1, then
    ``C -> inner_channels`` ReLU ``-> 1`` sigmoid."""
    C = feature_dimension
    return nn.Sequential(
        nn.Sequential(
            nn.Conv2d(2 * C, C, 3, padding=1), nn.BatchNorm2d(C, momentum=1), nn.ReLU(), nn.AdaptiveMaxPool2d(5)
        ),
        nn.Sequential(nn.Conv2d(C, C, 3, padding=0), nn.BatchNorm2d(C, momentum=1), nn.ReLU(), nn.AdaptiveMaxPool2d(1)),
        nn.Flatten(),
        nn.Linear(C, inner_channels),
        nn.ReLU(),
        nn.Linear(inner_channels, 1),
        nn.Sigmoid(),
    )


def _explain_easyfsl_relation_module(module, state_dict, prefix, _metadata, _strict, _missing, _unexpected, errors):
    """An easyfsl state dict loaded into the default relation module: say how to load it."""
    if isinstance(module.relation_module, RelationModule) and prefix + "relation_module.0.0.weight" in state_dict:
        errors.append(
            "this state dict has easyfsl's default relation module, another network than "
            "fastmeta's RelationModule: build RelationNetworks(..., relation_module="
            "easyfsl_relation_module(feature_dimension)) to load it"
        )
