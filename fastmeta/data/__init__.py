"""Data for meta-learning, without downloads: episodes drawn with tensor
indexing, Omniglot and class-per-folder image sets read from local files, a
built-in character dataset, and MAML's sinusoid tasks."""

from .characters import Characters
from .episodes import Episode, EpisodeSampler
from .images import ImageFolder, LabelledImages, cache_dir, data_dir
from .omniglot import Omniglot
from .sinusoid import sinusoid_tasks

__all__ = [
    "Characters",
    "Episode",
    "EpisodeSampler",
    "ImageFolder",
    "LabelledImages",
    "Omniglot",
    "cache_dir",
    "data_dir",
    "sinusoid_tasks",
]
