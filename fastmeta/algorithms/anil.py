"""ANIL (Raghu, Raghu, Bengio and Vinyals, "Rapid Learning or Feature Reuse?
Towards Understanding the Effectiveness of MAML", 2020): only the head
adapts."""

from typing import Dict, Optional

import torch
from torch import nn

from .batched_maml import BatchedMAML
from .engine import Loss, call_with_parameters, convolution_weights

__all__ = ["ANIL"]


class ANIL(nn.Module):
    """ANIL (Raghu et al. 2020): almost no inner loop. The body (a feature
    extractor) is meta-learned by the outer loop only; the head is adapted to
    each task by :class:`BatchedMAML` on the body's features, all tasks at
    once (with the fused MLP kernels when the head is an MLP, as a linear
    classifier is). The meta-gradient reaches the body through the head's
    gradient with respect to its inputs.

    ``anil(x_support, y_support, x_query, y_query)`` on ``[T, N, ...]``
    inputs returns the mean query loss over tasks. The body embeds all
    tasks' support images in one call, then their query images in another,
    its convolutions channels-last on the CPU, the faster layout there (see
    :class:`fastmeta.nn.ChannelsLastConv2d`; the values are the same).

    Args:
        body: maps ``[n, ...]`` inputs to ``[n, D]`` features.
        head: the adapted learner on ``[n, D]`` features (e.g. ``nn.Linear(D, ways)``).
        inner_lr, inner_steps, first_order, learn_inner_lr, loss: as
            :class:`BatchedMAML`'s (the loss defaults to cross-entropy here).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from fastmeta.algorithms import ANIL
        >>> from fastmeta.nn import Conv4
        >>> anil = ANIL(Conv4(1), nn.Sequential(nn.Linear(64, 5)), inner_lr=0.4)
        >>> x_s, y_s = torch.rand(4, 5, 1, 28, 28), torch.arange(5).expand(4, 5)    # 4 tasks, 5-way 1-shot
        >>> x_q, y_q = torch.rand(4, 10, 1, 28, 28), torch.arange(5).repeat(2).expand(4, 10)
        >>> anil(x_s, y_s, x_q, y_q).backward()   # gradients for the head and the body
        >>> anil.predict(x_s, y_s, x_q).shape
        torch.Size([4, 10, 5])
    """

    def __init__(
        self,
        body: nn.Module,
        head: nn.Module,
        inner_lr: float,
        inner_steps: int = 1,
        first_order: bool = False,
        learn_inner_lr: bool = False,
        loss: Loss = "cross_entropy",
    ):
        super().__init__()
        self.body = body
        self.head = BatchedMAML(head, inner_lr, inner_steps, first_order, learn_inner_lr, loss)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The body's features ``[T, N, D]`` of inputs ``[T, N, ...]``."""
        if x.dim() < 2:
            raise ValueError(f"ANIL: inputs must be [T, N, ...] (tasks, examples, ...), got shape {list(x.shape)}")
        images = x.flatten(0, 1)
        convolutions = convolution_weights(self.body)
        if convolutions and images.device.type == "cpu":
            features = call_with_parameters(self.body, dict(self.body.named_parameters()), (images,), convolutions)
        else:
            features = self.body(images)
        if features.dim() != 2:
            raise ValueError(f"ANIL: the body must return [n, D] features, got shape {list(features.shape)}")
        return features.unflatten(0, x.shape[:2])

    def forward(
        self,
        x_support: torch.Tensor,
        y_support: torch.Tensor,
        x_query: torch.Tensor,
        y_query: torch.Tensor,
        return_outputs: bool = False,
    ):
        """The mean over tasks of the query loss after adapting the head
        (with ``return_outputs``, a :class:`MetaBatchOutput`)."""
        return self.head(self.features(x_support), y_support, self.features(x_query), y_query, return_outputs)

    @torch.no_grad()
    def adapt(
        self, x_support: torch.Tensor, y_support: torch.Tensor, steps: Optional[int] = None
    ) -> Dict[str, torch.Tensor]:
        """The head's per-task adapted parameters ``{name: [T, *shape]}``."""
        return self.head.adapt(self.features(x_support), y_support, steps)

    @torch.no_grad()
    def predict(
        self, x_support: torch.Tensor, y_support: torch.Tensor, x_query: torch.Tensor, steps: Optional[int] = None
    ) -> torch.Tensor:
        """The adapted heads' outputs on the query features, ``[T, Q, ...]``."""
        return self.head.predict(self.features(x_support), y_support, self.features(x_query), steps)
