"""Memory-augmented neural networks (Santoro et al. 2016)."""

import numbers
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from .._checks import check_integer_labels

__all__ = ["MANN"]


class MANN(nn.Module):
    """A memory-augmented neural network with least-recently-used access
    (Santoro et al. 2016) for few-shot classification of sequences.

    Each episode is a sequence of examples; at step ``t`` the LSTM controller
    reads the example's features and the one-hot label of step ``t - 1`` (the
    label arrives one step late), and the model predicts the label of step
    ``t``. A label of -1 is never shown (the next step reads zeros): that is
    how a few-shot episode's queries follow its support examples.

    From the controller's output, each of ``read_heads`` heads emits a key
    (tanh), a write gate ``sigmoid(alpha)`` and a key strength (softplus, as
    the Neural Turing Machine's; the paper's reads correspond to strength 1).
    The memory ``[B, memory_slots, memory_width]`` is written and read by
    :func:`fastmeta.ops.mann_memory` (usage update, least-used selection,
    write and cosine-softmax read, one fused call for all steps), and a
    linear classifier maps [controller output, reads] to logits.

    The controller sees no reads, so it runs over the whole sequence in one
    ``nn.LSTM`` call before the memory; the memory starts at ``1e-6`` in every
    cell, with zero usage and read weights.

    Args:
        input_size: features per example (after ``embedding``).
        num_classes: classes per episode (the labels' range).
        hidden_size: the controller's LSTM size (200 in the paper).
        memory_slots, memory_width: the memory's shape (128 x 40).
        read_heads: read (and write) heads (4).
        decay: the usage decay ``gamma``.
        embedding: a module mapping ``[n, ...]`` examples to ``[n,
            input_size]``; default: flatten (the paper's 20x20 images).

    Example:
        >>> model = MANN(input_size=400, num_classes=5)
        >>> images, labels = torch.rand(16, 50, 1, 20, 20), torch.randint(0, 5, (16, 50))
        >>> model(images, labels).shape   # predictions of each step's label
        torch.Size([16, 50, 5])
    """

    def __init__(
        self,
        input_size: int,
        num_classes: int,
        hidden_size: int = 200,
        memory_slots: int = 128,
        memory_width: int = 40,
        read_heads: int = 4,
        decay: float = 0.95,
        embedding: Optional[nn.Module] = None,
    ):
        super().__init__()
        for name, value in (
            ("input_size", input_size),
            ("num_classes", num_classes),
            ("hidden_size", hidden_size),
            ("memory_slots", memory_slots),
            ("memory_width", memory_width),
            ("read_heads", read_heads),
        ):
            if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
                raise ValueError(f"MANN: {name} must be a positive integer, got {value!r}")
        input_size, num_classes, hidden_size = int(input_size), int(num_classes), int(hidden_size)
        memory_slots, memory_width, read_heads = int(memory_slots), int(memory_width), int(read_heads)
        self.input_size, self.num_classes = input_size, num_classes
        self.memory_slots, self.memory_width, self.read_heads = memory_slots, memory_width, read_heads
        self.decay = decay
        self.embedding = embedding if embedding is not None else nn.Flatten()
        self.controller = nn.LSTM(input_size + num_classes, hidden_size, batch_first=True)
        self.heads = nn.Linear(hidden_size, read_heads * (memory_width + 2))
        self.classifier = nn.Linear(hidden_size + read_heads * memory_width, num_classes)

    def controller_inputs(self, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``[B, T, input_size + num_classes]``: each step's features and the
        previous step's one-hot label (zeros at the first step)."""
        if inputs.dim() < 2:
            raise ValueError(
                f"MANN: inputs must be [B, T, ...] (episodes, steps, example), got shape {list(inputs.shape)}"
            )
        B, T = inputs.shape[:2]
        check_integer_labels("MANN", "labels", labels)
        if list(labels.shape) != [B, T]:
            raise ValueError(
                f"MANN: labels must be [B, T] = {[B, T]} like inputs' first two dimensions, got {list(labels.shape)}"
            )
        if labels.numel() and (labels.min() < -1 or labels.max() >= self.num_classes):
            raise ValueError(
                f"MANN: labels must be in 0..{self.num_classes - 1} (num_classes = "
                f"{self.num_classes}), or -1 for a label not shown; got values in "
                f"{labels.min().item()}..{labels.max().item()}"
            )
        features = self.embedding(inputs.flatten(0, 1)) if B * T else inputs.new_zeros(0, self.input_size)
        if features.dim() != 2 or features.shape[1] != self.input_size:
            raise ValueError(
                f"MANN: each example must give input_size = {self.input_size} features "
                f"after the embedding, got shape {list(features.shape[1:])}"
            )
        shown = F.one_hot(labels.clamp_min(0), self.num_classes) * (labels >= 0)[..., None]
        previous = shown.to(features.dtype).roll(1, dims=1)
        previous[:, :1] = 0
        return torch.cat([features.view(B, T, self.input_size), previous], -1)

    def head_outputs(self, hidden: torch.Tensor):
        """Keys ``[..., H, W]``, write gates and key strengths ``[..., H]``
        from controller outputs ``[..., hidden_size]``."""
        out = self.heads(hidden).unflatten(-1, (self.read_heads, self.memory_width + 2))
        keys, alpha, strength = out.split([self.memory_width, 1, 1], -1)
        return torch.tanh(keys), torch.sigmoid(alpha[..., 0]), F.softplus(strength[..., 0])

    def initial_state(self, batch: int, like: torch.Tensor):
        """The memory, usage and read weights an episode starts from."""
        S, W, H = self.memory_slots, self.memory_width, self.read_heads
        return like.new_full((batch, S, W), 1e-6), like.new_zeros(batch, S), like.new_zeros(batch, H, S)

    def forward(self, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, T, num_classes]`` of each step's label, from
        ``inputs [B, T, ...]`` and ``labels [B, T]`` (step t sees labels
        before t only)."""
        x = self.controller_inputs(inputs, labels)
        if x.shape[0] * x.shape[1] == 0:  # no episodes or no steps: no logits
            return x.new_zeros(*x.shape[:2], self.num_classes)
        hidden, _ = self.controller(x)
        keys, gates, strengths = self.head_outputs(hidden)
        memory = ops.mann_memory(*self.initial_state(x.shape[0], x), keys, gates, strengths, self.decay)
        return self.classifier(torch.cat([hidden, memory.reads.flatten(2)], -1))

    def loss(self, inputs: torch.Tensor, labels: torch.Tensor, targets: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Cross-entropy of every step's prediction of ``targets`` (default:
        ``labels``), averaged; targets of -1 are left out."""
        logits = self(inputs, labels)
        targets = labels if targets is None else targets
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1)
