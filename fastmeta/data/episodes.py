"""Few-shot episodes drawn with tensor indexing: no per-example Python loop."""

import numbers
from typing import Iterator, NamedTuple, Optional

import torch

from .._checks import check_integer_labels
from .images import as_float_images

__all__ = ["Episode", "EpisodeSampler"]


class Episode(NamedTuple):
    """A batch of ``B`` episodes of ``ways`` classes.

    ``support [B, ways*shots, ...]`` and ``query [B, ways*queries, ...]`` are
    grouped by class (class ``w`` owns rows ``w*shots .. (w+1)*shots-1``);
    ``support_labels`` and ``query_labels`` are in ``0..ways-1``;
    ``classes [B, ways]`` holds each episode's original class ids, and
    ``support_indices`` / ``query_indices`` the dataset indices drawn.
    """

    support: torch.Tensor
    support_labels: torch.Tensor
    query: torch.Tensor
    query_labels: torch.Tensor
    classes: torch.Tensor
    support_indices: torch.Tensor
    query_indices: torch.Tensor


class EpisodeSampler:
    """Draws batches of N-way K-shot episodes from a labelled dataset.

    Each episode picks ``ways`` distinct classes uniformly, then
    ``shots + queries`` distinct examples of each class; an example never
    appears twice in an episode. All ``episodes_per_batch`` episodes of a
    batch are drawn at once by sorting random keys, so a dataset held as one
    tensor (on the CPU or a GPU) yields episodes at memory speed.

    Args:
        dataset: a :class:`~fastmeta.data.LabelledImages` (or any object with
            ``images`` and ``labels`` tensors), a pair ``(examples, labels)``
            of tensors, a dataset with easyfsl's ``get_labels()`` whose items
            are ``(example, label)`` (fetched one by one: slower), or a
            tensor of labels alone (the episodes then hold dataset indices).
        ways, shots, queries: classes per episode, support and query examples
            per class.
        episodes_per_batch: episodes ``B`` per batch.
        num_batches: batches per iteration (None: endless).
        seed, generator: the random stream (a ``torch.Generator`` on the
            CPU); the same seed gives the same episodes.

    Raises:
        ValueError: fewer classes than ``ways``, or a class with fewer than
            ``shots + queries`` examples. TypeError: non-integer labels.

    Example:
        >>> data = LabelledImages(torch.rand(60, 1, 8, 8), torch.arange(6).repeat_interleave(10))
        >>> sampler = EpisodeSampler(data, ways=5, shots=1, queries=3, episodes_per_batch=4, seed=0)
        >>> episode = sampler.sample()
        >>> episode.support.shape, episode.query_labels.shape
        (torch.Size([4, 5, 1, 8, 8]), torch.Size([4, 15]))
    """

    def __init__(
        self,
        dataset,
        ways: int,
        shots: int,
        queries: int,
        *,
        episodes_per_batch: int = 1,
        num_batches: Optional[int] = None,
        seed: Optional[int] = None,
        generator: Optional[torch.Generator] = None,
    ):
        for name, value, least in (
            ("ways", ways, 1),
            ("shots", shots, 1),
            ("queries", queries, 0),
            ("episodes_per_batch", episodes_per_batch, 1),
        ):
            if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < least:
                raise ValueError(f"EpisodeSampler: {name} must be an integer >= {least}, got {value!r}")
        if num_batches is not None and (not isinstance(num_batches, numbers.Integral) or num_batches < 0):
            raise ValueError(f"EpisodeSampler: num_batches must be an integer >= 0 or None, got {num_batches!r}")
        ways, shots, queries, episodes_per_batch = int(ways), int(shots), int(queries), int(episodes_per_batch)
        num_batches = None if num_batches is None else int(num_batches)
        if generator is not None and seed is not None:
            raise ValueError("EpisodeSampler: give a seed or a generator, not both")
        self.ways, self.shots, self.queries = ways, shots, queries
        self.episodes_per_batch, self.num_batches = episodes_per_batch, num_batches
        if generator is None:
            generator = torch.Generator()
            generator.manual_seed(seed) if seed is not None else generator.seed()
        self.generator = generator
        self.examples, self.fetch, labels = _examples_and_labels(dataset)
        self._index_classes(labels)

    def _index_classes(self, labels: torch.Tensor):
        if labels.dim() != 1:
            raise ValueError(f"EpisodeSampler: labels must be one-dimensional, got shape {list(labels.shape)}")
        check_integer_labels("EpisodeSampler", "labels", labels)
        labels = labels.cpu()
        class_ids, per_example_class, counts = torch.unique(labels, return_inverse=True, return_counts=True)
        if len(class_ids) < self.ways:
            raise ValueError(f"EpisodeSampler: ways={self.ways} but the dataset has only {len(class_ids)} classes")
        needed = self.shots + self.queries
        short = (counts < needed).nonzero().squeeze(1)
        if len(short):
            c = short[0].item()
            raise ValueError(
                f"EpisodeSampler: class {class_ids[c].item()} has {counts[c].item()} "
                f"examples, fewer than shots + queries = {needed} "
                f"({len(short)} such classes)"
            )
        # table[c, j]: the index of class c's j-th example; padded with 0.
        order = torch.argsort(per_example_class, stable=True)
        starts = torch.cumsum(counts, 0) - counts
        position = torch.arange(len(labels)) - starts[per_example_class[order]]
        self.table = torch.zeros(len(class_ids), int(counts.max()), dtype=torch.long)
        self.table[per_example_class[order], position] = order
        self.class_ids, self.counts = class_ids, counts

    def sample_indices(self):
        """``(support_indices [B, ways*shots], query_indices [B, ways*queries],
        classes [B, ways])``: dataset indices and original class ids."""
        B, W, K = self.episodes_per_batch, self.ways, self.shots + self.queries
        g = self.generator
        chosen = torch.rand(B, len(self.class_ids), generator=g).topk(W, dim=1).indices
        keys = torch.rand(B, W, self.table.shape[1], generator=g)
        keys.masked_fill_(torch.arange(self.table.shape[1]) >= self.counts[chosen][..., None], -1.0)
        positions = keys.topk(K, dim=2).indices
        indices = self.table[chosen[..., None], positions]
        support = indices[..., : self.shots].reshape(B, W * self.shots)
        query = indices[..., self.shots :].reshape(B, W * self.queries)
        return support, query, self.class_ids[chosen]

    def sample(self) -> Episode:
        """One batch of episodes (see :class:`Episode`)."""
        support_idx, query_idx, classes = self.sample_indices()
        B, W = classes.shape
        device = self.examples.device if self.examples is not None else torch.device("cpu")
        support_labels = torch.arange(W, device=device).repeat_interleave(self.shots).expand(B, -1)
        query_labels = torch.arange(W, device=device).repeat_interleave(self.queries).expand(B, -1)
        return Episode(
            self._gather(support_idx),
            support_labels.contiguous(),
            self._gather(query_idx),
            query_labels.contiguous(),
            classes.to(device),
            support_idx,
            query_idx,
        )

    def _gather(self, indices: torch.Tensor) -> torch.Tensor:
        if self.fetch is not None:
            items = [self.fetch(i) for i in indices.flatten().tolist()]
            return torch.stack(items).view(*indices.shape, *items[0].shape) if items else torch.empty(*indices.shape)
        if self.examples is None:
            return indices
        gathered = self.examples[indices.to(self.examples.device, non_blocking=True)]
        return as_float_images(gathered)

    def __iter__(self) -> Iterator[Episode]:
        count = 0
        while self.num_batches is None or count < self.num_batches:
            yield self.sample()
            count += 1

    def __len__(self) -> int:
        if self.num_batches is None:
            raise TypeError("EpisodeSampler: an endless sampler (num_batches=None) has no length")
        return self.num_batches


def _examples_and_labels(dataset):
    """(examples tensor or None, per-index fetch function or None, labels)."""
    if isinstance(dataset, torch.Tensor):
        return None, None, dataset
    if isinstance(dataset, (tuple, list)) and len(dataset) == 2 and all(isinstance(t, torch.Tensor) for t in dataset):
        examples, labels = dataset
    elif isinstance(getattr(dataset, "images", None), torch.Tensor) and isinstance(
        getattr(dataset, "labels", None), torch.Tensor
    ):
        examples, labels = dataset.images, dataset.labels
    elif hasattr(dataset, "get_labels"):
        return None, lambda i: torch.as_tensor(dataset[i][0]), torch.as_tensor(dataset.get_labels())
    else:
        raise TypeError(
            "EpisodeSampler: dataset must be a LabelledImages, an (examples, labels) "
            "pair of tensors, a dataset with get_labels(), or a tensor of labels; got "
            f"{type(dataset).__name__}"
        )
    if examples.shape[:1] != labels.shape[:1]:
        raise ValueError(f"EpisodeSampler: {examples.shape[0]} examples but {labels.shape[0]} labels")
    return examples, None, labels
