"""FEAT (Ye et al. 2020): prototypes adapted to the episode by a set-to-set
attention module."""

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .prototypical import PrototypicalNetworks

__all__ = ["FEAT", "MultiHeadAttention"]


class MultiHeadAttention(nn.Module):
    """FEAT's set-to-set function: multi-head scaled dot-product attention
    with a residual connection and layer norm, ``layer_norm(x +
    dropout(fc(attention(x W_q, x W_k, x W_v))))``, on sets ``[B, n,
    d_model]``. easyfsl's (and the FEAT authors') parameter names and
    initialisation, so their state dicts load; the attention is PyTorch's
    ``scaled_dot_product_attention``. Returns ``(output, fc output)``.

    Args:
        n_head, d_model, d_k, d_v: heads, input width, key and value widths per head.
        dropout: on the attention weights and on the output, in training.
        flag_norm: apply the residual connection and layer norm.
    """

    def __init__(self, n_head: int, d_model: int, d_k: int, d_v: int, dropout: float = 0.1, flag_norm: bool = True):
        super().__init__()
        self.n_head, self.d_k, self.d_v = n_head, d_k, d_v
        self.w_qs = nn.Linear(d_model, n_head * d_k, bias=False)
        self.w_ks = nn.Linear(d_model, n_head * d_k, bias=False)
        self.w_vs = nn.Linear(d_model, n_head * d_v, bias=False)
        nn.init.normal_(self.w_qs.weight, mean=0, std=math.sqrt(2.0 / (d_model + d_k)))
        nn.init.normal_(self.w_ks.weight, mean=0, std=math.sqrt(2.0 / (d_model + d_k)))
        nn.init.normal_(self.w_vs.weight, mean=0, std=math.sqrt(2.0 / (d_model + d_v)))
        self.layer_norm = nn.LayerNorm(d_model)
        self.fc = nn.Linear(n_head * d_v, d_model)
        nn.init.xavier_normal_(self.fc.weight)
        self.dropout = nn.Dropout(dropout)
        self.flag_norm = flag_norm

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        def heads(x, projection, width):  # [B, n, d_model] -> [B, heads, n, width]
            return projection(x).unflatten(-1, (self.n_head, width)).transpose(1, 2)

        attended = F.scaled_dot_product_attention(
            heads(q, self.w_qs, self.d_k),
            heads(k, self.w_ks, self.d_k),
            heads(v, self.w_vs, self.d_v),
            dropout_p=self.dropout.p if self.training else 0.0,
        )
        fc_output = self.fc(attended.transpose(1, 2).flatten(2))
        output = self.dropout(fc_output)
        if self.flag_norm:
            output = self.layer_norm(output + q)
        return output, fc_output


class FEAT(PrototypicalNetworks):
    """FEAT (Ye et al. 2020, "Few-Shot Learning via Embedding Adaptation with
    Set-to-Set Functions", CVPR): the class means of an episode pass together
    through an attention module (the set-to-set function), and queries are
    scored by minus their distance to the adapted prototypes. Batched: the
    attention runs on the ``[B, ways, D]`` prototypes of all episodes at once.

    As easyfsl: the scores are minus the Euclidean distance by default
    (``metric="sqeuclidean"`` is the paper's, before its temperature), and
    the training loss is the prototypical cross-entropy (the paper adds a
    contrastive regulariser, not included).

    Args:
        backbone: maps images to features ``[n, D]``.
        attention_module: maps ``(q, k, v)``, each ``[B, ways, D]``, to a
            pair whose first element is ``[B, ways, D]``; None builds
            ``MultiHeadAttention(1, feature_dimension, feature_dimension,
            feature_dimension)``, the authors' default.
        feature_dimension: D, for the default attention module.
        metric, use_softmax, features: as :class:`PrototypicalNetworks`.
    """

    def __init__(
        self,
        backbone: Optional[nn.Module] = None,
        *,
        attention_module: Optional[nn.Module] = None,
        feature_dimension: Optional[int] = None,
        metric: str = "euclidean",
        use_softmax: bool = False,
        **features,
    ):
        super().__init__(backbone, metric, use_softmax, **features)
        if attention_module is None:
            if feature_dimension is None:
                raise ValueError("FEAT: give an attention_module, or the feature_dimension of the default one")
            attention_module = MultiHeadAttention(1, feature_dimension, feature_dimension, feature_dimension)
        self.attention_module = attention_module

    def prepare_support(self, features: torch.Tensor, labels: torch.Tensor, ways: int) -> torch.Tensor:
        prototypes = super().prepare_support(features, labels, ways)
        return self.attention_module(prototypes, prototypes, prototypes)[0]

    def process_support_set(self, support_images: torch.Tensor, support_labels: torch.Tensor):
        """As :class:`FewShotClassifier`'s, ``prototypes`` being the adapted ones."""
        super().process_support_set(support_images, support_labels)
        self.prototypes = self.support_state[0]
