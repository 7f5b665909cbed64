"""easyfsl's ``TaskSampler``, for ``DataLoader`` pipelines, drawn by
fastmeta's vectorised sampler."""

import numbers
from typing import Iterator, List, Optional, Sequence, Tuple

import torch
from torch.utils.data import Sampler

from .episodes import EpisodeSampler

__all__ = ["TaskSampler"]

_INTEGER_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


class TaskSampler(Sampler):
    """Yields the dataset indices of ``n_tasks`` few-shot tasks, each a list
    of ``n_way * (n_shot + n_query)`` ints grouped by class (each class's
    ``n_shot + n_query`` items in a row), for a ``DataLoader``'s
    ``batch_sampler``, with ``episodic_collate_fn`` as its ``collate_fn``.

    easyfsl's interface on current PyTorch (easyfsl's own calls a
    ``Sampler`` constructor that PyTorch 2 no longer has). All of an
    iteration's tasks are drawn at once by :class:`EpisodeSampler`: classes
    uniformly without replacement, then items uniformly without replacement
    within each class.

    Args:
        dataset: any dataset with easyfsl's ``get_labels()``, a ``labels``
            attribute (list or tensor), or a tensor of labels.
        n_way, n_shot, n_query: classes per task, support and query items per class.
        n_tasks: tasks per iteration (``len(sampler)``).
        seed: the random stream; None draws one from PyTorch's global
            generator, so ``torch.manual_seed`` makes the tasks reproducible.

    Raises:
        ValueError: fewer classes than ``n_way``, or a class with fewer than
            ``n_shot + n_query`` items.

    Example:
        >>> sampler = TaskSampler(dataset, n_way=5, n_shot=1, n_query=15, n_tasks=100)
        >>> loader = DataLoader(dataset, batch_sampler=sampler, num_workers=4,
        ...                     collate_fn=sampler.episodic_collate_fn)
        >>> support, support_labels, query, query_labels, class_ids = next(iter(loader))
    """

    def __init__(self, dataset, n_way: int, n_shot: int, n_query: int, n_tasks: int, *, seed: Optional[int] = None):
        super().__init__()
        for name, value, least in (
            ("n_way", n_way, 1),
            ("n_shot", n_shot, 0),
            ("n_query", n_query, 0),
            ("n_tasks", n_tasks, 0),
        ):
            if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < least:
                raise ValueError(f"TaskSampler: {name} must be an integer >= {least}, got {value!r}")
        if n_shot + n_query < 1:
            raise ValueError("TaskSampler: n_shot + n_query must be at least 1, got 0")
        self.n_way, self.n_shot, self.n_query, self.n_tasks = int(n_way), int(n_shot), int(n_query), int(n_tasks)
        if seed is None:
            seed = int(torch.randint(2**62, ()))
        try:
            self.episodes = EpisodeSampler(
                _labels(dataset),
                self.n_way,
                self.n_shot + self.n_query,
                0,
                episodes_per_batch=max(self.n_tasks, 1),
                seed=seed,
            )
        except ValueError as error:
            raise ValueError(f"TaskSampler (n_way = {n_way}, n_shot + n_query = {n_shot + n_query}): {error}") from None

    def __len__(self) -> int:
        return self.n_tasks

    def __iter__(self) -> Iterator[List[int]]:
        indices = self.episodes.sample_indices()[0][: self.n_tasks]  # [n_tasks, n_way * (n_shot + n_query)]
        yield from indices.tolist()

    def episodic_collate_fn(self, input_data: Sequence[Tuple[torch.Tensor, int]]):
        """Collates one task's ``(image tensor, label)`` items, in the order
        the sampler gave, into ``(support_images [n_way * n_shot, ...],
        support_labels, query_images [n_way * n_query, ...], query_labels,
        class_ids)``: the labels are in ``0..n_way-1``, label ``i`` being
        the dataset class ``class_ids[i]``, classes numbered in their order
        in the task."""
        items = self._cast_input_data_to_tensor_int_tuple(input_data)
        per_class = self.n_shot + self.n_query
        if len(items) != self.n_way * per_class:
            raise ValueError(
                f"TaskSampler: a task has n_way * (n_shot + n_query) = {self.n_way * per_class} items, got {len(items)}"
            )
        class_ids = list(dict.fromkeys(label for _, label in items))
        images = torch.stack([image for image, _ in items]).unflatten(0, (self.n_way, per_class))
        labels = torch.tensor([class_ids.index(label) for _, label in items]).view(self.n_way, per_class)
        return (
            images[:, : self.n_shot].flatten(0, 1),
            labels[:, : self.n_shot].flatten(),
            images[:, self.n_shot :].flatten(0, 1),
            labels[:, self.n_shot :].flatten(),
            class_ids,
        )

    @staticmethod
    def _cast_input_data_to_tensor_int_tuple(input_data) -> List[Tuple[torch.Tensor, int]]:
        """The items with their labels as ints (easyfsl's name: its tests
        call it); a TypeError or ValueError names the first bad item."""
        cast = []
        for position, (image, label) in enumerate(input_data):
            if not isinstance(image, torch.Tensor):
                raise TypeError(f"TaskSampler: item {position}'s image is a {type(image).__name__}, not a tensor")
            if isinstance(label, torch.Tensor):
                if label.dtype not in _INTEGER_DTYPES:
                    raise TypeError(
                        f"TaskSampler: item {position}'s label has dtype {label.dtype}, not an integer dtype"
                    )
                if label.dim() != 0:
                    raise ValueError(
                        f"TaskSampler: item {position}'s label must be a 0-dim tensor, got shape {list(label.shape)}"
                    )
            elif not isinstance(label, numbers.Integral) or isinstance(label, bool):
                raise TypeError(f"TaskSampler: item {position}'s label is a {type(label).__name__}, not an integer")
            cast.append((image, int(label)))
        return cast


def _labels(dataset) -> torch.Tensor:
    if isinstance(dataset, torch.Tensor):
        return dataset
    if hasattr(dataset, "get_labels"):
        return torch.as_tensor(dataset.get_labels())
    if hasattr(dataset, "labels"):
        return torch.as_tensor(dataset.labels)
    raise TypeError(
        "TaskSampler: dataset must have get_labels() or a labels attribute, or be a tensor "
        f"of labels; got {type(dataset).__name__}"
    )
