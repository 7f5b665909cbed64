"""Graph neural networks for few-shot learning (Garcia & Bruna 2018)."""

import numbers
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from .few_shot import FewShotClassifier

__all__ = ["FewShotGNN"]


class PairMLP(nn.Module):
    """The learned metric of one GNN layer: an MLP on ``|x_i - x_j|`` with
    hidden widths ``ratio`` times the node width, leaky ReLU between layers,
    one output."""

    def __init__(self, width: int, ratio: Sequence[float], negative_slope: float):
        super().__init__()
        widths = [width, *(max(1, round(r * width)) for r in ratio), 1]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.negative_slope = negative_slope

    def adjacency(
        self, nodes: torch.Tensor, function: Callable = ops.gnn_adjacency, last_row: bool = False
    ) -> torch.Tensor:
        """``[G, n, n]``: softmax over the other nodes of the MLP's outputs
        (only the last node's row with ``last_row``, the others 0)."""
        return function(
            nodes, [m.weight for m in self.layers], [m.bias for m in self.layers], self.negative_slope, last_row
        )


class GraphConv(nn.Module):
    """``Linear([x, A x])``, then (except in the last layer) batch norm over
    the nodes and leaky ReLU."""

    def __init__(self, width: int, out: int, last: bool, negative_slope: float):
        super().__init__()
        self.linear = nn.Linear(2 * width, out)
        self.norm = None if last else nn.BatchNorm1d(out)
        self.negative_slope = negative_slope

    def forward(self, nodes: torch.Tensor, adjacency: torch.Tensor) -> torch.Tensor:
        out = self.linear(torch.cat([nodes, adjacency @ nodes], -1))
        if self.norm is None:
            return out
        return F.leaky_relu(self.norm(out.flatten(0, 1)).view_as(out), self.negative_slope)


class FewShotGNN(FewShotClassifier):
    """Few-shot learning with graph neural networks (Garcia & Bruna 2018).

    Each query gets a graph with the episode's support examples: nodes are
    the backbone's features concatenated with the one-hot label (uniform
    ``1 / ways`` for the query). Each layer builds the adjacency with a
    learned metric, an MLP on ``|x_i - x_j|`` and a softmax over the other
    nodes (:func:`fastmeta.ops.gnn_adjacency`: fused, without the ``[G, n,
    n, F]`` pair buffer), then a graph convolution on ``[x, A x]`` adds
    ``hidden // 2`` features to every node (dense connections); the last
    layer's convolution gives the query node's ``ways`` logits, from the
    query's row of the last adjacency (the only row it reads).

    Differs from the paper's code: the metric MLP has no batch norm (its
    statistics would span every pair, which the fused adjacency never
    holds at once) and no dropout.

    Args:
        backbone: maps images ``[n, ...]`` to features ``[n, feature_dimension]``.
        feature_dimension: the backbone's features per image.
        ways: classes per episode (the label field of the nodes).
        layers: graph layers before the last (2 on Omniglot in the paper).
        hidden: the paper's ``nf``: each layer adds ``hidden // 2`` features.
        metric_ratio: the metric MLP's hidden widths, as multiples of the
            node width (the paper's ``[2, 2, 1, 1]``).
        negative_slope: the leaky ReLUs' slope.

    Example:
        >>> model = FewShotGNN(Conv4(1), feature_dimension=64, ways=5)
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
        layers: int = 2,
        hidden: int = 96,
        metric_ratio: Sequence[float] = (2, 2, 1, 1),
        negative_slope: float = 0.01,
        use_softmax: bool = False,
        **features,
    ):
        super().__init__(backbone, use_softmax, **features)
        for name, value, least in (
            ("feature_dimension", feature_dimension, 1),
            ("ways", ways, 1),
            ("layers", layers, 0),
            ("hidden", hidden, 2),
        ):
            if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < least:
                raise ValueError(f"FewShotGNN: {name} must be an integer >= {least}, got {value!r}")
        feature_dimension, ways, layers, hidden = int(feature_dimension), int(ways), int(layers), int(hidden)
        self.feature_dimension, self.ways = feature_dimension, ways
        widths = [feature_dimension + ways + k * (hidden // 2) for k in range(layers + 1)]
        self.metrics = nn.ModuleList(PairMLP(w, metric_ratio, negative_slope) for w in widths)
        self.convs = nn.ModuleList(GraphConv(w, hidden // 2, False, negative_slope) for w in widths[:-1])
        self.last = GraphConv(widths[-1], ways, True, negative_slope)

    def prepare_support(self, features: torch.Tensor, labels: torch.Tensor, ways: int):
        self.check_built_for(ways, features)
        return torch.cat([features, F.one_hot(labels.long(), ways).to(features.dtype)], -1)

    def query_graphs(self, support_nodes: torch.Tensor, query_features: torch.Tensor) -> torch.Tensor:
        """``[B * Q, S + 1, F]``: one graph per query, its support nodes first."""
        B, S, width = support_nodes.shape
        Q = query_features.shape[1]
        self.check_built_for(None, query_features, "query features")
        uniform = query_features.new_full((B, Q, self.ways), 1.0 / self.ways)
        query_nodes = torch.cat([query_features, uniform], -1)
        support = support_nodes[:, None].expand(B, Q, S, width)
        return torch.cat([support, query_nodes[:, :, None]], 2).flatten(0, 1)

    def graph_logits(self, nodes: torch.Tensor) -> torch.Tensor:
        """The last node's logits ``[G, ways]`` of graphs ``[G, n, F]``."""
        for metric, conv in zip(self.metrics, self.convs):
            nodes = torch.cat([nodes, conv(nodes, metric.adjacency(nodes))], -1)
        # Only the last (query) node's output is read, so the last layer needs
        # only that node's row of the adjacency: n - 1 pairs instead of all.
        read = (self.metrics[-1].adjacency(nodes, last_row=True)[:, -1:] @ nodes)[:, 0]
        return self.last.linear(torch.cat([nodes[:, -1], read], -1))

    def score_queries(self, support_nodes: torch.Tensor, query_features: torch.Tensor) -> torch.Tensor:
        B, Q = query_features.shape[:2]
        return self.graph_logits(self.query_graphs(support_nodes, query_features)).view(B, Q, self.ways)
