"""A training run's configuration: defaults per method (each method's paper on
Omniglot), a TOML file, and command-line flags, in that order of precedence."""

import dataclasses
import math
import numbers
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np

__all__ = ["Config", "ConfigError", "METHODS", "make_config"]


class ConfigError(ValueError):
    """A configuration that cannot run (reported in one line, exit status 2)."""


@dataclass
class Config:
    method: str
    data: str = "chars"
    split: str = "auto"  # which classes train, validate and test: SPLITS
    ways: int = 5
    shots: int = 1
    queries: int = 15
    meta_batch: int = 1
    steps: int = 2000
    backbone: str = "conv4"
    lr: float = 1e-3
    lr_decay_every: int = 0  # steps between halvings of lr; 0: constant
    inner_lr: float = 0.4
    inner_steps: int = 1
    test_inner_steps: int = 3
    outer_lr: float = 1.0  # Reptile's step towards the adapted parameters
    lam: float = 2.0  # iMAML's proximal regularisation
    cg_steps: int = 5  # iMAML's conjugate-gradient iterations
    device: str = "cpu"
    seed: int = 0
    validate_every: int = 500
    val_episodes: int = 100
    checkpoint_every: int = 500
    log_every: int = 10
    image_size: int = 28

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


# Each method's defaults where they differ from Config's (papers' Omniglot settings).
METHODS: Dict[str, Dict[str, Any]] = {
    "protonet": dict(ways=60, queries=5, lr_decay_every=2000),  # Snell et al.
    "matching": dict(ways=5, queries=15),  # Vinyals et al.
    "relation": dict(ways=5, queries=19),  # Sung et al.
    "siamese": dict(ways=20, queries=5),  # Koch et al., on episodes
    "maml": dict(meta_batch=32),  # Finn et al.
    "fomaml": dict(meta_batch=32),
    "metasgd": dict(meta_batch=32),  # Li et al.
    "anil": dict(meta_batch=32),  # Raghu et al.
    "imaml": dict(meta_batch=32, inner_lr=0.1, inner_steps=16, test_inner_steps=16),  # Rajeswaran et al.
    "reptile": dict(meta_batch=5, inner_lr=0.1, inner_steps=5, test_inner_steps=10),  # Nichol et al.
    "meta-lstm": dict(meta_batch=4, inner_steps=5, test_inner_steps=5),  # Ravi & Larochelle
    "mann": dict(meta_batch=16, shots=9, queries=1),  # Santoro et al.: 5 x 10 steps
    "gnn": dict(meta_batch=32, queries=1),  # Garcia & Bruna
    "metanet": dict(meta_batch=4, queries=5),  # Munkhdalai & Yu
}
BACKBONES = ("conv4", "resnet12")
# The named splits each kind of data takes; "auto" is resolved when a run starts.
SPLITS = {
    "chars": ("auto", "random"),
    "omniglot": ("auto", "random", "vinyals", "lake"),
    "folder": ("auto", "random", "files"),
}
POSITIVE = (
    "ways",
    "shots",
    "meta_batch",
    "cg_steps",
    "validate_every",
    "val_episodes",
    "checkpoint_every",
    "log_every",
    "image_size",
)


def make_config(method: str, config_file: Optional[str] = None, **flags) -> Config:
    """The method's defaults, then the TOML file's values, then the flags
    that are not None."""
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    values: Dict[str, Any] = {"method": method, **METHODS[method]}
    if config_file is not None:
        from_file = _read_toml(Path(config_file))
        if from_file.get("method", method) != method:
            raise ConfigError(
                f"the configuration file {config_file} sets method = "
                f"{from_file['method']!r}, but the command names {method!r}"
            )
        values.update(from_file)
    values.update({k: v for k, v in flags.items() if v is not None})
    return checked(values)


def checked(values: Dict[str, Any]) -> Config:
    names = {f.name: f for f in dataclasses.fields(Config)}
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ConfigError(f"unknown configuration key(s) {unknown}; known: {sorted(names)}")
    if values.get("method") not in METHODS:
        raise ConfigError(f"unknown method {values.get('method')!r}; choose one of {', '.join(METHODS)}")
    config = Config(**values)
    defaults = Config(method=config.method)
    kinds = {str: str, int: numbers.Integral, float: numbers.Real}
    for name in names:
        value, default = getattr(config, name), getattr(defaults, name)
        if not isinstance(value, kinds[type(default)]) or isinstance(value, (bool, np.bool_)):
            raise ConfigError(f"{name} must be a {type(default).__name__}, got {value!r}")
        setattr(config, name, type(default)(value))  # NumPy scalars become Python numbers
    for name in names:
        value = getattr(config, name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{name} must be a finite number, got {value}")
    for name in POSITIVE:
        if getattr(config, name) < 1:
            raise ConfigError(f"{name} must be >= 1, got {getattr(config, name)}")
    for name in ("lr", "outer_lr"):
        if not getattr(config, name) > 0:
            raise ConfigError(f"{name} must be > 0, got {getattr(config, name)}")
    if config.inner_lr < 0:
        raise ConfigError(f"inner_lr must be >= 0, got {config.inner_lr}")
    if not 0 <= config.seed < 2**32:
        raise ConfigError(f"seed must be in 0 .. 2**32 - 1, got {config.seed}")
    for name in ("queries", "steps", "inner_steps", "test_inner_steps", "lr_decay_every"):
        if getattr(config, name) < 0:
            raise ConfigError(f"{name} must be >= 0, got {getattr(config, name)}")
    if config.queries < 1:
        raise ConfigError("queries must be >= 1 (the loss is computed on the queries)")
    if not config.lam > 0:
        raise ConfigError(f"lam must be > 0, got {config.lam}")
    if config.backbone not in BACKBONES:
        raise ConfigError(f"unknown backbone {config.backbone!r}; choose one of {', '.join(BACKBONES)}")
    check_device(config.device)
    kind = config.data.partition(":")[0]
    if kind not in ("chars", "omniglot", "folder") or (kind == "folder" and not config.data[7:]):
        raise ConfigError(f"unknown data {config.data!r}; use chars, omniglot[:PATH] or folder:PATH")
    if config.split not in SPLITS[kind]:
        raise ConfigError(f"split {config.split!r} does not apply to {kind} data; use {', '.join(SPLITS[kind])}")
    return config


def check_device(device: str):
    """``cpu``, or ``cuda`` / ``cuda:N`` naming a GPU this PyTorch can use."""
    import torch

    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if parsed.type not in ("cpu", "cuda"):
        raise ConfigError(f"device {device!r} is not supported; use cpu, cuda or cuda:N")
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"device {device!r}: no GPU is available to this PyTorch "
                f"({torch.__version__}, CUDA {torch.version.cuda or 'none'})"
            )
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ConfigError(f"device {device!r}: there are {torch.cuda.device_count()} GPU(s)")


def _read_toml(path: Path) -> Dict[str, Any]:
    try:
        with open(path, "rb") as f:
            values = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"the configuration file {path} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"the configuration file {path} is a folder") from None
    except OSError as error:
        raise ConfigError(f"the configuration file {path} cannot be read: {error.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(f"the configuration file {path} is not valid TOML: {error}") from None
    return {key.replace("-", "_"): value for key, value in values.items()}
