"""Data for meta-learning, without downloads: episodes drawn with tensor
indexing, Omniglot, class-per-folder image sets and CSV split files read from local files, a
built-in character dataset, and MAML's sinusoid tasks."""

from .characters import Characters
from .episodes import Episode, EpisodeSampler
from .images import CSVImages, ImageFolder, LabelledImages, cache_dir, data_dir
from .omniglot import Omniglot, official_characters, one_shot_runs
from .sinusoid import sinusoid_tasks
from .task_sampler import TaskSampler

__all__ = [
    "CSVImages",
    "Characters",
    "Episode",
    "EpisodeSampler",
    "ImageFolder",
    "LabelledImages",
    "Omniglot",
    "TaskSampler",
    "cache_dir",
    "data_dir",
    "official_characters",
    "one_shot_runs",
    "sinusoid_tasks",
]
