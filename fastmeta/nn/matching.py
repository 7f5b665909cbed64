"""Matching networks with full-context embeddings (Vinyals et al. 2016)."""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from .few_shot import FewShotClassifier

__all__ = ["MatchingNetworks"]


class MatchingNetworks(FewShotClassifier):
    """Matching networks (Vinyals et al. 2016) with full-context embeddings.

    The support features are contextualised by a bidirectional LSTM over the
    support set, ``g(x_i) = x_i + h_fw_i + h_bw_i``; each query's by an
    attention LSTM that reads the support set for ``S`` steps (the number of
    support examples): ``r = softmax(h g^T) g``, ``h, c = LSTM([f(x), r], (h,
    c))``, ``h = h + f(x)``: with the default ``nn.LSTMCell``, one fused
    ``matching_attention_lstm`` call. The query's class probabilities are
    attention over the support labels, ``softmax(h normalize(g)^T)
    onehot(y)``, one fused ``attention_readout``, and the scores are their
    logarithm (plus 1e-6, as in easyfsl).

    As easyfsl, the attention is the dot product with the normalised support
    embeddings (the paper's cosine times the query's norm). :meth:`loss` is
    the negative log-likelihood of the scores (easyfsl users train with
    ``nn.CrossEntropyLoss`` on the scores, nearly the same since the
    probabilities sum to one).

    Args:
        backbone: maps images to features ``[n, D]``.
        feature_dimension: ``D``.
        support_encoder, query_encoder: replace the default
            ``nn.LSTM(D, D, bidirectional=True, batch_first=True)`` and
            ``nn.LSTMCell(2 D, D)``.
        fce: use full-context embeddings (else attend with the backbone features).

    Example:
        >>> model = MatchingNetworks(Conv4(1), feature_dimension=64)
        >>> model.process_support_set(torch.rand(5, 1, 28, 28), torch.arange(5))
        >>> model(torch.rand(3, 1, 28, 28)).shape
        torch.Size([3, 5])
    """

    def __init__(
        self,
        backbone: Optional[nn.Module] = None,
        *,
        feature_dimension: int,
        support_encoder: Optional[nn.Module] = None,
        query_encoder: Optional[nn.Module] = None,
        fce: bool = True,
        use_softmax: bool = False,
        **features,
    ):
        super().__init__(backbone, use_softmax, **features)
        self.feature_dimension, self.fce = feature_dimension, fce
        if fce:
            self.support_encoder = support_encoder or nn.LSTM(
                feature_dimension, feature_dimension, batch_first=True, bidirectional=True
            )
            self.query_encoder = query_encoder or nn.LSTMCell(2 * feature_dimension, feature_dimension)
        self.register_load_state_dict_pre_hook(_rename_easyfsl_encoders)

    def prepare_support(self, features: torch.Tensor, labels: torch.Tensor, ways: int):
        if features.shape[-1] != self.feature_dimension:
            raise ValueError(
                f"MatchingNetworks: the backbone returns {features.shape[-1]} "
                f"features, feature_dimension is {self.feature_dimension}"
            )
        if self.fce:
            both = self.support_encoder(features)[0]
            features = features + both[..., : self.feature_dimension] + both[..., self.feature_dimension :]
        one_hot = F.one_hot(labels.long(), ways).to(features.dtype)
        return features, F.normalize(features, dim=-1), one_hot

    def score_queries(self, support_state, query_features: torch.Tensor) -> torch.Tensor:
        support, support_unit, one_hot = support_state
        if self.fce:
            query_features = self._attention_lstm(support, query_features)
        probabilities = ops.attention_readout(query_features, support_unit, one_hot, metric="dot")
        return (probabilities + 1e-6).log()

    def _attention_lstm(self, support: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        cell = self.query_encoder
        if type(cell) is nn.LSTMCell:
            bias = cell.bias_ih + cell.bias_hh if cell.bias else None
            return ops.matching_attention_lstm(query, support, cell.weight_ih, cell.weight_hh, bias)
        B, Q, D = query.shape
        flat_query = query.reshape(B * Q, D)
        hidden, state = flat_query, torch.zeros_like(flat_query)
        for _ in range(support.shape[1]):
            read = ops.attention_readout(hidden.view(B, Q, D), support, support, metric="dot")
            hidden, state = cell(torch.cat([flat_query, read.reshape(B * Q, D)], 1), (hidden, state))
            hidden = hidden + flat_query
        return hidden.view(B, Q, D)

    def loss_of_scores(self, scores: torch.Tensor, query_labels: torch.Tensor) -> torch.Tensor:
        """Negative log-likelihood of the attention's class probabilities."""
        return F.nll_loss(scores.flatten(0, 1), query_labels.flatten())


EASYFSL_ENCODER_NAMES = {
    "support_features_encoder.": "support_encoder.",
    "query_features_encoding_cell.": "query_encoder.",
}


def _rename_easyfsl_encoders(module, state_dict, prefix, *_):
    """Loads easyfsl's state dicts: its encoders' parameter names renamed."""
    for key in [k for k in state_dict if k.startswith(prefix)]:
        for easyfsl, ours in EASYFSL_ENCODER_NAMES.items():
            if key.startswith(prefix + easyfsl):
                state_dict[prefix + ours + key[len(prefix + easyfsl) :]] = state_dict.pop(key)
