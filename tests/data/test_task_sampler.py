"""easyfsl's TaskSampler interface: index lists for a DataLoader's
batch_sampler and the episodic collate function."""

import pickle

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from fastmeta.data import TaskSampler


class Items(Dataset):
    """Item i is (a 2x3 image filled with i, label labels[i]); easyfsl's get_labels()."""

    def __init__(self, labels):
        self.labels = list(labels)

    def __getitem__(self, i):
        return torch.full((2, 3), float(i)), self.labels[i]

    def __len__(self):
        return len(self.labels)

    def get_labels(self):
        return self.labels


LABELS = [c for c in range(7) for _ in range(5 + c)]  # 7 classes of 5..11 items


@pytest.mark.parametrize("n_way, n_shot, n_query", [(3, 1, 2), (7, 2, 3), (1, 0, 5), (2, 5, 0)])
def test_tasks_are_lists_of_distinct_indices_grouped_by_distinct_classes(n_way, n_shot, n_query):
    sampler = TaskSampler(Items(LABELS), n_way, n_shot, n_query, n_tasks=20, seed=0)
    tasks = list(sampler)
    assert len(tasks) == len(sampler) == 20
    for task in tasks:
        assert all(type(i) is int for i in task) and len(task) == len(set(task)) == n_way * (n_shot + n_query)
        classes = [LABELS[i] for i in task]
        blocks = [classes[c * (n_shot + n_query) : (c + 1) * (n_shot + n_query)] for c in range(n_way)]
        assert all(len(set(block)) == 1 for block in blocks) and len({b[0] for b in blocks}) == n_way


def test_classes_are_drawn_uniformly_and_tasks_differ_between_iterations():
    sampler = TaskSampler(torch.tensor(LABELS), 2, 1, 1, n_tasks=3500, seed=1)
    first = torch.tensor([LABELS[t[0]] for t in sampler])
    counts = torch.bincount(first, minlength=7).double()  # first class of each task: 1/7 each
    assert ((counts - 500).abs() < 5 * (3500 * (1 / 7) * (6 / 7)) ** 0.5).all()
    assert list(sampler) != list(sampler)


def test_seeds_and_the_global_generator_make_tasks_reproducible():
    assert list(TaskSampler(Items(LABELS), 3, 1, 1, 5, seed=3)) == list(TaskSampler(Items(LABELS), 3, 1, 1, 5, seed=3))
    torch.manual_seed(0)
    a = list(TaskSampler(Items(LABELS), 3, 1, 1, 5))
    torch.manual_seed(0)
    assert a == list(TaskSampler(Items(LABELS), 3, 1, 1, 5))
    assert list(TaskSampler(Items(LABELS), 3, 1, 1, 0)) == []


def test_collate_splits_support_and_query_and_numbers_classes_in_task_order():
    sampler = TaskSampler(Items(LABELS), 3, 2, 1, 1, seed=0)
    dataset = Items(LABELS)
    task = next(iter(sampler))
    support, support_labels, query, query_labels, class_ids = sampler.episodic_collate_fn([dataset[i] for i in task])
    assert support.shape == (6, 2, 3) and query.shape == (3, 2, 3)
    assert support_labels.tolist() == [0, 0, 1, 1, 2, 2] and query_labels.tolist() == [0, 1, 2]
    assert class_ids == [LABELS[task[0]], LABELS[task[3]], LABELS[task[6]]]
    assert support[:, 0, 0].tolist() == [float(task[i]) for i in (0, 1, 3, 4, 6, 7)]
    assert query[:, 0, 0].tolist() == [float(task[i]) for i in (2, 5, 8)]


def test_data_loader_with_workers():
    dataset = Items(LABELS)
    sampler = TaskSampler(dataset, 4, 1, 2, n_tasks=6, seed=0)
    pickle.loads(pickle.dumps(sampler))  # what a spawned worker receives
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=2, collate_fn=sampler.episodic_collate_fn)
    batches = list(loader)
    assert len(batches) == 6
    support, support_labels, query, query_labels, class_ids = batches[0]
    assert support.shape == (4, 2, 3) and query_labels.shape == (8,) and len(class_ids) == 4


def test_bad_input_messages():
    with pytest.raises(ValueError, match=r"n_way = 8.*ways=8 but the dataset has only 7 classes"):
        TaskSampler(Items(LABELS), 8, 1, 1, 1)
    with pytest.raises(ValueError, match=r"n_shot \+ n_query = 6\): EpisodeSampler: class 0 has 5 examples"):
        TaskSampler(Items(LABELS), 2, 3, 3, 1)
    with pytest.raises(ValueError, match="n_shot \\+ n_query must be at least 1"):
        TaskSampler(Items(LABELS), 2, 0, 0, 1)
    with pytest.raises(ValueError, match="n_tasks must be an integer >= 0, got -1"):
        TaskSampler(Items(LABELS), 2, 1, 1, -1)
    with pytest.raises(TypeError, match="dataset must have get_labels"):
        TaskSampler(object(), 2, 1, 1, 1)
    sampler = TaskSampler(Items(LABELS), 2, 1, 1, 1)
    image = torch.ones(2, 2)
    for items, error, message in [
        ([(image, 0), ([[1.0]], 0)], TypeError, "item 1's image is a list"),
        ([(image, 0.5)], TypeError, "item 0's label is a float"),
        ([(image, "0")], TypeError, "item 0's label is a str"),
        ([(image, True)], TypeError, "item 0's label is a bool"),
        ([(image, torch.tensor(True))], TypeError, "dtype torch.bool"),
        ([(image, torch.ones(2, dtype=torch.float16))], TypeError, "dtype torch.float16"),
        (
            [(image, 0), (image, torch.ones(1, dtype=torch.int8))],
            ValueError,
            r"item 1's label must be a 0-dim tensor, got shape \[1\]",
        ),
        ([(image, 0)] * 3, ValueError, "a task has n_way \\* \\(n_shot \\+ n_query\\) = 4 items, got 3"),
    ]:
        with pytest.raises(error, match=message):
            sampler.episodic_collate_fn(items)
    assert sampler._cast_input_data_to_tensor_int_tuple([(image, torch.tensor(3))])[0][1] == 3
