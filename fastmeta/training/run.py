"""Meta-training and evaluation runs: episodes, the training loop with
validation, logs, plots and checkpoints, resuming, and many processes
(torch.distributed)."""

import hashlib
import json
import math
import os
import random
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Union

import numpy as np
import torch
import torch.distributed as dist

from ..data import Characters, Episode, EpisodeSampler, ImageFolder, LabelledImages, Omniglot
from .config import Config, ConfigError, checked
from .methods import Method, build_method

__all__ = ["train", "evaluate", "load_checkpoint", "CheckpointError", "Trained"]

CHECKPOINT = "checkpoint.pt"
FORMAT = "fastmeta-run-1"
SHARED_OMNIGLOT = Path(__file__).resolve().parents[3] / "shared" / "data" / "omniglot"
SPLIT_FRACTIONS = (0.7, 0.1, 0.2)


class CheckpointError(ValueError):
    """A checkpoint that cannot be read: missing, truncated or not fastmeta's."""


# ---------------------------------------------------------------- data


def load_data(config: Config, split: str) -> LabelledImages:
    """The ``split`` ("train", "val", "test") classes of the run's data;
    training classes get their rotations as extra classes (as in the
    literature) for 28x28 character data."""
    kind, _, path = config.data.partition(":")
    rotations = split == "train" and kind in ("chars", "omniglot")
    size = config.image_size
    if kind == "chars":
        data = Characters(split=split, rotations=rotations, image_size=size)
    elif kind == "omniglot":
        root = Path(path) if path else SHARED_OMNIGLOT
        data = Omniglot(root, split=split, rotations=rotations, image_size=size)
    else:
        root = Path(path)
        if (root / split).is_dir():  # the mini-ImageNet layout: train/, val/, test/
            data = ImageFolder(root / split, image_size=size)
        else:
            data = ImageFolder(root, image_size=size).choose_split(split, SPLIT_FRACTIONS, 0)
    return data.to(config.device)


def check_ways(data: LabelledImages, ways: int, split: str):
    if data.num_classes < ways:
        raise ConfigError(f"{ways}-way episodes need {ways} classes, but the {split} split has "
                          f"{data.num_classes}")


def episode_sampler(data: LabelledImages, ways: int, shots: int, queries: int, **options):
    try:
        return EpisodeSampler(data, ways, shots, queries, **options)
    except ValueError as error:  # e.g. a class with fewer than shots + queries examples
        raise ConfigError(str(error)) from None


def task_seed(seed: int, step: int, task: int) -> int:
    """The seed of task ``task`` of step ``step``: episodes depend on the
    run's seed and on nothing else (not on the number of processes, nor on
    where a resumed run stopped)."""
    digest = hashlib.blake2b(f"{seed}/{step}/{task}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


class Episodes:
    """Episodes of a dataset, task ``t`` of step ``s`` drawn from its own seed."""

    def __init__(self, data: LabelledImages, ways: int, shots: int, queries: int, seed: int):
        self.generator = torch.Generator()
        self.sampler = episode_sampler(data, ways, shots, queries, generator=self.generator)
        self.seed = seed

    def tasks(self, step: int, first: int, count: int) -> Episode:
        """Tasks ``first .. first + count - 1`` of step ``step``, as one batch."""
        parts = []
        for task in range(first, first + count):
            self.generator.manual_seed(task_seed(self.seed, step, task))
            parts.append(self.sampler.sample())
        return Episode(*(torch.cat(fields) for fields in zip(*parts)))


# ---------------------------------------------------------------- processes


@dataclass
class Processes:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def start_processes(config: Config) -> Processes:
    """torch.distributed under torchrun (WORLD_SIZE > 1): NCCL on GPUs, gloo
    on CPUs; one GPU per process (LOCAL_RANK)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Processes()
    if not dist.is_initialized():
        cuda = config.device.startswith("cuda")
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo")
    if config.device.startswith("cuda"):
        config.device = f"cuda:{torch.cuda.current_device()}"
    return Processes(dist.get_rank(), dist.get_world_size())


def all_reduce_gradients(model: torch.nn.Module, weight: float):
    """Sums ``weight * grad`` over the processes, as one flat buffer, and
    averages the floating-point buffers (batch-norm statistics)."""
    params = [p for p in model.parameters() if p.requires_grad]
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                      for p in params]) * weight
    dist.all_reduce(flat)
    offset = 0
    for p in params:
        p.grad = flat[offset:offset + p.numel()].view_as(p).clone()
        offset += p.numel()
    buffers = [b for b in model.buffers() if b.is_floating_point()]
    if buffers:
        flat = torch.cat([b.reshape(-1) for b in buffers]) / dist.get_world_size()
        dist.all_reduce(flat)
        offset = 0
        for b in buffers:
            b.copy_(flat[offset:offset + b.numel()].view_as(b))
            offset += b.numel()


def all_reduce_mean(loss: torch.Tensor, acc: Optional[torch.Tensor]):
    """The mean over the processes of the loss (and accuracy) for the logs."""
    both = torch.stack([loss.detach().float().reshape(()),
                        (loss.new_tensor(-1.0) if acc is None else acc).float().reshape(()).to(loss.device)])
    dist.all_reduce(both)
    both /= dist.get_world_size()
    return both[0], None if acc is None else both[1]


# ---------------------------------------------------------------- evaluation


def confidence_interval(accuracies: torch.Tensor):
    """Mean accuracy and the half-width of its 95% confidence interval, in percent."""
    mean = accuracies.mean().item() * 100
    if len(accuracies) < 2:
        return mean, float("nan")
    return mean, 1.96 * accuracies.std().item() * 100 / math.sqrt(len(accuracies))


def episode_accuracies(method: Method, data: LabelledImages, ways: int, shots: int, queries: int,
                       episodes: int, seed: int, batch: int = 25) -> torch.Tensor:
    """Each episode's query accuracy, over ``episodes`` episodes of ``data``."""
    sampler = episode_sampler(data, ways, shots, queries, episodes_per_batch=batch, seed=seed)
    training = method.model.training
    method.model.eval()
    accuracies: List[torch.Tensor] = []
    try:
        for _ in range(math.ceil(episodes / batch)):
            e = sampler.sample()
            accuracies.append((method.predict(e) == e.query_labels).float().mean(1).cpu())
    finally:
        method.model.train(training)
    return torch.cat(accuracies)[:episodes] if accuracies else torch.zeros(0)


# ---------------------------------------------------------------- checkpoints


def rng_states() -> Dict:
    states = {"torch": torch.get_rng_state(), "python": random.getstate(),
              "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: Dict):
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_atomically(content: Dict, path: Path):
    """Writes to a temporary file beside ``path``, then renames it: a reader
    sees the old checkpoint or the new one, never a partial one."""
    temporary = path.with_name(path.name + ".tmp")
    torch.save(content, temporary)
    os.replace(temporary, path)


def read_checkpoint(path: Union[str, Path]) -> Dict:
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        content = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # noqa: BLE001: torch.load raises many kinds on a bad file
        raise CheckpointError(f"{path} is not a readable checkpoint (truncated or corrupted?): "
                              f"{type(error).__name__}: {str(error).splitlines()[0]}") from None
    if not isinstance(content, dict) or content.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a fastmeta training checkpoint")
    return content


@dataclass
class Trained:
    """A checkpoint, loaded: ``model`` (the method's ``nn.Module``), the
    ``config``, the ``step`` it was saved at, and ``method``, whose
    ``predict(episode)`` classifies an episode's queries."""
    method: Method
    config: Config
    step: int

    @property
    def model(self) -> torch.nn.Module:
        return self.method.model


def load_checkpoint(path: Union[str, Path], device: Optional[str] = None) -> Trained:
    """Loads a run folder's checkpoint (or a checkpoint file) for evaluation
    or further use."""
    content = read_checkpoint(path)
    config = checked(content["config"])
    if device is not None:
        config.device = device
    method = build_method(config, content["image_shape"])
    method.model.load_state_dict(content["model"])
    return Trained(method, config, content["step"])


# ---------------------------------------------------------------- training


class StopRequest:
    """Turns SIGINT and SIGTERM into a request to stop after the current step."""

    def __init__(self):
        self.signal: Optional[int] = None
        self.previous = {}

    def __enter__(self):
        for number in (signal.SIGINT, signal.SIGTERM):
            self.previous[number] = signal.signal(number, self._handle)
        return self

    def _handle(self, number, frame):
        self.signal = number

    def __exit__(self, *exc):
        for number, handler in self.previous.items():
            signal.signal(number, handler)


class Log:
    """``metrics.jsonl`` and ``metrics.png`` in the run folder (main process only)."""

    def __init__(self, out: Path, enabled: bool):
        self.path, self.plot_path, self.enabled = out / "metrics.jsonl", out / "metrics.png", enabled

    def write(self, **record):
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def plot(self):
        if not self.enabled:
            return
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        records = [json.loads(line) for line in self.path.read_text().splitlines() if line]
        train = [r for r in records if "loss" in r]
        val = [r for r in records if "val_accuracy" in r]
        figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
        left.plot([r["step"] for r in train], [r["loss"] for r in train])
        left.set(xlabel="step", ylabel="training loss")
        right.errorbar([r["step"] for r in val], [r["val_accuracy"] for r in val],
                       yerr=[r["val_ci"] for r in val], marker="o")
        right.set(xlabel="step", ylabel="validation accuracy (%)")
        figure.tight_layout()
        temporary = self.plot_path.with_name("metrics.tmp.png")
        figure.savefig(temporary)
        plt.close(figure)
        os.replace(temporary, self.plot_path)


def train(config: Config, out: Union[str, Path], resume: bool = False, progress: bool = True) -> Trained:
    """Meta-trains ``config.method`` and writes the run to ``out``: the
    checkpoint (every ``checkpoint_every`` steps, at the end, and on SIGINT
    or SIGTERM), ``metrics.jsonl``, ``metrics.png`` and ``config.json``.
    With ``resume``, continues the run saved in ``out``."""
    from tqdm import tqdm

    out = Path(out)
    processes = start_processes(config)
    if config.meta_batch % processes.world:
        raise ConfigError(f"meta_batch {config.meta_batch} must be a multiple of the number of "
                          f"processes ({processes.world})")
    saved = read_checkpoint(out) if resume else None
    if not resume and (out / CHECKPOINT).exists():
        raise ConfigError(f"{out} already holds a run; resume it with --resume {out} or choose "
                          "another --out")
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    np.random.seed(config.seed)
    train_data, val_data = load_data(config, "train"), load_data(config, "val")
    check_ways(train_data, config.ways, "train")
    check_ways(val_data, config.ways, "val")
    episodes = Episodes(train_data, config.ways, config.shots, config.queries, config.seed)
    method = build_method(config, train_data.images.shape[1:])
    optimizer = method.optimizer()
    schedule = torch.optim.lr_scheduler.StepLR(optimizer, config.lr_decay_every or 2**62, gamma=0.5)
    step = 0
    if saved is not None:
        method.model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        schedule.load_state_dict(saved["schedule"])
        set_rng_states(saved["rng"])
        step = saved["step"]
    if processes.main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    log = Log(out, processes.main)

    def save():
        if processes.main:
            save_atomically({"format": FORMAT, "config": config.to_dict(), "step": step,
                             "image_shape": tuple(train_data.images.shape[1:]),
                             "model": method.model.state_dict(), "optimizer": optimizer.state_dict(),
                             "schedule": schedule.state_dict(), "rng": rng_states()}, out / CHECKPOINT)

    def validate():
        accuracies = episode_accuracies(method, val_data, config.ways, config.shots, 15,
                                        config.val_episodes, seed=config.seed + 1)
        mean, ci = confidence_interval(accuracies)
        log.write(step=step, val_accuracy=mean, val_ci=ci)
        log.plot()
        return mean

    local = config.meta_batch // processes.world
    bar = tqdm(total=config.steps, initial=step, disable=not (progress and processes.main),
               desc=f"{config.method} {config.ways}-way {config.shots}-shot", unit="step")
    started, done_since = time.perf_counter(), step
    with StopRequest() as stop:
        while step < config.steps and stop.signal is None:
            e = episodes.tasks(step, processes.rank * local, local)
            optimizer.zero_grad(set_to_none=True)
            loss, acc = method.compute_gradients(e)
            if processes.world > 1:
                all_reduce_gradients(method.model, 1.0 / processes.world)
                loss, acc = all_reduce_mean(loss, acc)
            optimizer.step()
            schedule.step()
            step += 1
            bar.update()
            if step % config.log_every == 0 or step == config.steps:
                rate = (step - done_since) * config.meta_batch / (time.perf_counter() - started)
                record = dict(step=step, loss=loss.item(), episodes_per_s=round(rate, 2))
                if acc is not None:
                    record["accuracy"] = round(float(acc) * 100, 2)
                log.write(**record)
                bar.set_postfix({k: v for k, v in record.items() if k != "step"})
            if processes.main and (step % config.validate_every == 0 or step == config.steps):
                bar.write(f"step {step}: validation accuracy {validate():.2f}%")
            if step % config.checkpoint_every == 0:
                save()
        save()
    bar.close()
    if stop.signal is not None:
        name = signal.Signals(stop.signal).name
        if processes.main:
            print(f"{name}: stopped at step {step}; the checkpoint is saved. Continue with "
                  f"fastmeta train --resume {out}")
        raise KeyboardInterrupt(name)
    return Trained(method, config, step)


def evaluate(path: Union[str, Path], episodes: int = 600, ways: Optional[int] = None,
             shots: Optional[int] = None, queries: int = 15, split: str = "test", seed: int = 0,
             device: Optional[str] = None) -> Dict:
    """Accuracy of a run (folder or checkpoint) on ``episodes`` episodes of
    its held-out ``split`` classes: mean and 95% confidence interval."""
    trained = load_checkpoint(path, device)
    config = trained.config
    ways, shots = ways or config.ways, shots or config.shots
    if config.method not in ("protonet", "matching", "relation", "siamese") and ways != config.ways:
        raise ConfigError(f"{config.method} was trained with a {config.ways}-way classifier; "
                          f"it evaluates {config.ways}-way episodes only, got ways={ways}")
    data = load_data(config, split)
    check_ways(data, ways, split)
    accuracies = episode_accuracies(trained.method, data, ways, shots, queries, episodes, seed)
    mean, ci = confidence_interval(accuracies)
    return {"method": config.method, "data": config.data, "split": split, "ways": ways,
            "shots": shots, "episodes": len(accuracies), "accuracy": mean, "ci95": ci,
            "step": trained.step}
