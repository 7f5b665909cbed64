"""Meta-training and evaluation runs: episodes, the training loop with
validation, logs, plots and checkpoints, resuming, and many processes
(torch.distributed)."""

import contextlib
import hashlib
import json
import math
import os
import random
import signal
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import numpy as np
import torch
import torch.distributed as dist

from ..data import (
    Characters,
    CSVImages,
    Episode,
    EpisodeSampler,
    ImageFolder,
    LabelledImages,
    Omniglot,
    data_dir,
    official_characters,
    one_shot_runs,
)
from ..nn.batch_norm_updates import RunningStatisticsUpdates, blend_running_statistics
from .config import Config, ConfigError, checked
from .methods import Method, build_method

__all__ = ["train", "evaluate", "evaluate_one_shot_runs", "load_checkpoint", "CheckpointError", "Trained"]

CHECKPOINT = "checkpoint.pt"
FORMAT = "fastmeta-run-1"
CHECKPOINT_FIELDS = ("config", "step", "image_shape", "model", "optimizer", "schedule", "rng")
SPLIT_FRACTIONS = (0.7, 0.1, 0.2)


class CheckpointError(ValueError):
    """A checkpoint that cannot be read: missing, truncated or not fastmeta's."""


# ---------------------------------------------------------------- data


@contextlib.contextmanager
def data_errors(source: str):
    """Data that cannot be read becomes a ConfigError naming its source and what failed."""
    try:
        yield
    except ConfigError:
        raise
    except (OSError, ValueError) as error:
        raise ConfigError(f"{source}: {str(error).splitlines()[0]}") from None


def load_data(config: Config, part: str) -> LabelledImages:
    """The ``part`` ("train", "val", "test") classes of the run's data, as
    its named split (``config.split``) defines them. Training classes of
    character data split at random get their rotations as extra classes (as
    in the literature); Vinyals et al.'s split has them in every part."""
    with data_errors(config.data):
        return _load_data(config, resolved_split(config), part).to(config.device)


def resolved_split(config: Config) -> str:
    """``config.split``, with "auto" made the official split the data has:
    Vinyals et al.'s for the complete Omniglot, the split files or folders
    of a folder that has them, else "random"."""
    kind, _, path = config.data.partition(":")
    if config.split != "auto":
        return config.split
    with data_errors(config.data):
        if kind == "omniglot":
            names = Omniglot(omniglot_root(config), image_size=config.image_size).class_names
            return "vinyals" if set(official_characters()) <= set(names) else "random"
        if kind == "folder":
            root = Path(path)
            has_files = any((root / f"{p}.csv").is_file() or (root / p).is_dir() for p in ("train", "val", "test"))
            return "files" if has_files else "random"
    return "random"


def omniglot_root(config: Config) -> Path:
    path = config.data.partition(":")[2]
    return Path(path) if path else data_dir() / "omniglot"


def _load_data(config: Config, split: str, part: str) -> LabelledImages:
    kind, _, path = config.data.partition(":")
    size = config.image_size
    if kind == "chars":
        return Characters(split=part, rotations=part == "train", image_size=size)
    if kind == "omniglot":
        rotations = split == "vinyals" or (split == "random" and part == "train")
        return Omniglot(omniglot_root(config), split=part, protocol=split, rotations=rotations, image_size=size)
    root = Path(path)
    if split == "random":
        return ImageFolder(root, image_size=size).choose_split(part, SPLIT_FRACTIONS, 0)
    if (root / f"{part}.csv").is_file():  # Ravi & Larochelle's split files, and images/
        return CSVImages(root / f"{part}.csv", image_size=size)
    if (root / part).is_dir():  # class folders in train/, val/, test/
        return ImageFolder(root / part, image_size=size)
    raise FileNotFoundError(f"no {part}.csv (with images/) nor {part}/ folder of classes in {root}")


def check_ways(data: LabelledImages, ways: int, split: str):
    if data.num_classes < ways:
        raise ConfigError(f"{ways}-way episodes need {ways} classes, but the {split} split has {data.num_classes}")


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
    """Sums ``weight * grad`` over the processes, as one flat buffer."""
    params = [p for p in model.parameters() if p.requires_grad]
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params]) * weight
    dist.all_reduce(flat)
    offset = 0
    for p in params:
        p.grad = flat[offset : offset + p.numel()].view_as(p).clone()
        offset += p.numel()


def apply_updates_in_one_process_order(model: torch.nn.Module, recorded: RunningStatisticsUpdates, local_tasks: int):
    """Sets the batch norms' running statistics to what one process running
    every task of the step computes: back to their values before the
    step, then every process's recorded updates applied in one
    process's order. A method normalises one task per call, in phases
    (supports, then queries, ...), so a process's calls are ``local_tasks``
    per phase, and one process's order is, phase by phase, the processes'
    calls in rank order."""
    norms = dict(model.named_modules())
    for name, local in recorded.updates.items():
        norm = norms[name]
        for buffer, value in zip(
            (norm.running_mean, norm.running_var, norm.num_batches_tracked), recorded.before[name]
        ):
            buffer.copy_(value)
        device = norm.running_mean.device
        counts = [torch.zeros((), dtype=torch.long, device=device) for _ in range(dist.get_world_size())]
        dist.all_gather(counts, torch.tensor(len(local), device=device))
        if len(set(int(c) for c in counts)) != 1:
            raise RuntimeError(
                f"batch norm {name}: the processes made {[int(c) for c in counts]} "
                "updates in one step; they must make as many"
            )
        if not local:
            continue
        mine = torch.stack(local).to(dtype=norm.running_mean.dtype)
        gathered = [torch.empty_like(mine) for _ in counts]
        dist.all_gather(gathered, mine)
        calls = len(local)
        per_phase = local_tasks if calls % local_tasks == 0 else calls
        for first in range(0, calls, per_phase):
            for updates in gathered:
                for mean, variance in updates[first : first + per_phase]:
                    blend_running_statistics(norm, mean, variance)


def meta_batch_gradients(method: Method, e: Episode, processes: Processes, local_tasks: int):
    """Adds the meta-batch's gradients to ``.grad`` (with several processes:
    each process's ``local_tasks`` tasks, all-reduced) and returns its loss
    and accuracy; the batch norms' running statistics become those of one
    process running every task."""
    if processes.world == 1:
        return method.compute_gradients(e)
    with RunningStatisticsUpdates(method.model) as recorded:
        loss, acc = method.compute_gradients(e)
    all_reduce_gradients(method.model, 1.0 / processes.world)
    apply_updates_in_one_process_order(method.model, recorded, local_tasks)
    return all_reduce_mean(loss, acc)


def all_reduce_mean(loss: torch.Tensor, acc: Optional[torch.Tensor]):
    """The mean over the processes of the loss (and accuracy) for the logs."""
    both = torch.stack(
        [
            loss.detach().float().reshape(()),
            (loss.new_tensor(-1.0) if acc is None else acc).float().reshape(()).to(loss.device),
        ]
    )
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


def episode_accuracies(
    method: Method, data: LabelledImages, ways: int, shots: int, queries: int, episodes: int, seed: int, batch: int = 25
) -> torch.Tensor:
    """Each episode's query accuracy, over ``episodes`` episodes of ``data``."""
    sampler = episode_sampler(data, ways, shots, queries, episodes_per_batch=batch, seed=seed)
    accuracies = [query_accuracies(method, sampler.sample()) for _ in range(math.ceil(episodes / batch))]
    return torch.cat(accuracies)[:episodes] if accuracies else torch.zeros(0)


def query_accuracies(method: Method, e: Episode) -> torch.Tensor:
    """Each of the batched episodes' query accuracy, the model in eval mode."""
    training = method.model.training
    method.model.eval()
    try:
        return (method.predict(e) == e.query_labels).float().mean(1).cpu()
    finally:
        method.model.train(training)


# ---------------------------------------------------------------- checkpoints


def rng_states() -> Dict:
    states = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
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
    sees the old checkpoint or the new one, never a partial one. A failed
    write (a full disk) removes the temporary file and raises a
    CheckpointError; the previous checkpoint stays."""
    temporary = path.with_name(path.name + ".tmp")
    try:
        torch.save(content, temporary)
        os.replace(temporary, path)
    except Exception as error:  # noqa: BLE001: a full disk surfaces as OSError or RuntimeError
        temporary.unlink(missing_ok=True)
        raise CheckpointError(
            f"could not write the checkpoint {path} (disk full?): "
            f"{str(error).splitlines()[0]}; the previous one is kept"
        ) from None


def read_checkpoint(path: Union[str, Path]) -> Dict:
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        content = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # noqa: BLE001: torch.load raises many kinds on a bad file
        raise CheckpointError(
            f"{path} is not a readable checkpoint (truncated or corrupted?): "
            f"{type(error).__name__}: {str(error).splitlines()[0]}"
        ) from None
    if not isinstance(content, dict) or content.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a fastmeta training checkpoint")
    missing = [key for key in CHECKPOINT_FIELDS if key not in content]
    if missing:
        raise CheckpointError(f"{path} is a damaged fastmeta checkpoint: it lacks {missing}")
    return content


@dataclass
class Trained:
    """A checkpoint, loaded: ``model`` (the method's ``nn.Module``), the
    ``config``, the ``step`` it was saved at, and ``method``, whose
    ``predict(episode)`` classifies an episode's queries."""

    method: Method
    config: Config
    step: int
    image_shape: Tuple[int, ...]

    @property
    def model(self) -> torch.nn.Module:
        return self.method.model


def load_checkpoint(path: Union[str, Path], device: Optional[str] = None) -> Trained:
    """Loads a run folder's checkpoint (or a checkpoint file) for evaluation
    or further use."""
    content = read_checkpoint(path)
    config = checked({**content["config"], **({} if device is None else {"device": device})})
    method = build_checked_method(config, content["image_shape"])
    load_model_state(method.model, content["model"], path)
    return Trained(method, config, content["step"], tuple(content["image_shape"]))


def build_checked_method(config: Config, image_shape) -> Method:
    try:
        return build_method(config, image_shape)
    except (RuntimeError, ValueError) as error:  # e.g. images too small for the pooling
        raise ConfigError(
            f"{config.method} with the {config.backbone} backbone cannot take "
            f"{tuple(image_shape)} images (image_size {config.image_size}): "
            f"{str(error).splitlines()[0]}"
        ) from None


def load_model_state(model: torch.nn.Module, state: Dict, path):
    try:
        model.load_state_dict(state)
    except RuntimeError as error:  # shapes that differ: a flag changed the model
        detail = next((line.strip() for line in str(error).splitlines()[1:] if line.strip()), "")
        raise CheckpointError(
            f"the model saved in {path} does not fit this configuration "
            f"(a flag such as --ways, --backbone or --image-size changed it?): "
            f"{detail}"
        ) from None


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
    """``metrics.jsonl`` and ``metrics.png`` in the run folder (main process
    only). A last line cut short (a killed writer, a full disk) is dropped
    when the log is opened; lines that do not parse are skipped when read."""

    def __init__(self, out: Path, enabled: bool):
        self.path, self.plot_path, self.enabled = out / "metrics.jsonl", out / "metrics.png", enabled
        if enabled and self.path.exists():
            content = self.path.read_bytes()
            if content and not content.endswith(b"\n"):
                with open(self.path, "r+b") as f:
                    f.truncate(content.rfind(b"\n") + 1)

    def write(self, **record):
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def records(self) -> List[Dict]:
        records = []
        for line in self.path.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict):
                records.append(record)
        return records

    def plot(self):
        """Redraws ``metrics.png``; a plot that cannot be drawn or written is
        a warning, not the end of the run."""
        if not self.enabled:
            return
        try:
            self._plot()
        except Exception as error:  # noqa: BLE001: matplotlib and the disk raise many kinds
            self.plot_path.with_name("metrics.tmp.png").unlink(missing_ok=True)
            warnings.warn(f"could not draw {self.plot_path}: {str(error).splitlines()[0]}")

    def _plot(self):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        records = self.records()
        train = [r for r in records if {"step", "loss"} <= r.keys()]
        val = [r for r in records if {"step", "val_accuracy", "val_ci"} <= r.keys()]
        figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
        left.plot([r["step"] for r in train], [r["loss"] for r in train])
        left.set(xlabel="step", ylabel="training loss")
        right.errorbar(
            [r["step"] for r in val], [r["val_accuracy"] for r in val], yerr=[r["val_ci"] for r in val], marker="o"
        )
        right.set(xlabel="step", ylabel="validation accuracy (%)")
        figure.tight_layout()
        temporary = self.plot_path.with_name("metrics.tmp.png")
        figure.savefig(temporary)
        plt.close(figure)
        os.replace(temporary, self.plot_path)


@contextlib.contextmanager
def saved_on_failure(save):
    """Writes the checkpoint when the training loop fails (validation, a
    log that cannot be written), so no finished step is lost; the failure
    is raised as it was."""
    try:
        yield
    except Exception:
        try:
            save()
        except CheckpointError:
            pass  # the original failure says more
        raise


def train(config: Config, out: Union[str, Path], resume: bool = False, progress: bool = True) -> Trained:
    """Meta-trains ``config.method`` and writes the run to ``out``: the
    checkpoint (every ``checkpoint_every`` steps, at the end, and on SIGINT
    or SIGTERM), ``metrics.jsonl``, ``metrics.png`` and ``config.json``.
    With ``resume``, continues the run saved in ``out``."""
    from tqdm import tqdm

    out = Path(out)
    processes = start_processes(config)
    if config.meta_batch % processes.world:
        raise ConfigError(
            f"meta_batch {config.meta_batch} must be a multiple of the number of processes ({processes.world})"
        )
    saved = read_checkpoint(out) if resume else None
    if not resume and (out / CHECKPOINT).exists():
        raise ConfigError(f"{out} already holds a run; resume it with --resume {out} or choose another --out")
    if not resume and (out / "metrics.jsonl").exists():
        raise ConfigError(
            f"{out} holds the logs of a run that stopped before its first checkpoint; "
            "remove them or choose another --out"
        )
    config = replace(config, split=resolved_split(config))
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    np.random.seed(config.seed)
    train_data, val_data = load_data(config, "train"), load_data(config, "val")
    check_ways(train_data, config.ways, "train")
    check_ways(val_data, config.ways, "val")
    episodes = Episodes(train_data, config.ways, config.shots, config.queries, config.seed)
    episode_sampler(val_data, config.ways, config.shots, config.queries)  # validation can be drawn
    method = build_checked_method(config, train_data.images.shape[1:])
    optimizer = method.optimizer()
    schedule = torch.optim.lr_scheduler.StepLR(optimizer, config.lr_decay_every or 2**62, gamma=0.5)
    step = 0
    if saved is not None:
        load_model_state(method.model, saved["model"], out)
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
            save_atomically(
                {
                    "format": FORMAT,
                    "config": config.to_dict(),
                    "step": step,
                    "image_shape": tuple(train_data.images.shape[1:]),
                    "model": method.model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "schedule": schedule.state_dict(),
                    "rng": rng_states(),
                },
                out / CHECKPOINT,
            )

    def validate():
        accuracies = episode_accuracies(
            method, val_data, config.ways, config.shots, config.queries, config.val_episodes, seed=config.seed + 1
        )
        mean, ci = confidence_interval(accuracies)
        log.write(step=step, val_accuracy=mean, val_ci=ci)
        log.plot()
        return mean

    local = config.meta_batch // processes.world
    bar = tqdm(
        total=config.steps,
        initial=step,
        disable=not (progress and processes.main),
        desc=f"{config.method} {config.ways}-way {config.shots}-shot",
        unit="step",
    )
    started, done_since = time.perf_counter(), step
    with StopRequest() as stop, saved_on_failure(save):
        while step < config.steps and stop.signal is None:
            e = episodes.tasks(step, processes.rank * local, local)
            optimizer.zero_grad(set_to_none=True)
            loss, acc = meta_batch_gradients(method, e, processes, local)
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
            if step % config.checkpoint_every == 0:
                save()
            if processes.main and (step % config.validate_every == 0 or step == config.steps):
                bar.write(f"step {step}: validation accuracy {validate():.2f}%")
        save()
    bar.close()
    if stop.signal is not None:
        name = signal.Signals(stop.signal).name
        if processes.main:
            print(
                f"{name}: stopped at step {step}; the checkpoint is saved. Continue with fastmeta train --resume {out}"
            )
        raise KeyboardInterrupt(name)
    return Trained(method, config, step, tuple(train_data.images.shape[1:]))


def evaluate(
    path: Union[str, Path],
    episodes: int = 600,
    ways: Optional[int] = None,
    shots: Optional[int] = None,
    queries: int = 15,
    split: str = "test",
    seed: int = 0,
    device: Optional[str] = None,
) -> Dict:
    """Accuracy of a run (folder or checkpoint) on ``episodes`` episodes of
    its held-out ``split`` classes: mean and 95% confidence interval."""
    for name, value in (("episodes", episodes), ("queries", queries), ("ways", ways), ("shots", shots)):
        if value is not None and value < 1:
            raise ConfigError(f"{name} must be >= 1, got {value}")
    if not 0 <= seed < 2**63:
        raise ConfigError(f"seed must be in 0 .. 2**63 - 1, got {seed}")
    trained = load_checkpoint(path, device)
    config = replace(trained.config, split=resolved_split(trained.config))  # "auto" in older runs
    ways = config.ways if ways is None else ways
    shots = config.shots if shots is None else shots
    check_evaluated_ways(config, ways)
    data = load_data(config, split)
    check_ways(data, ways, split)
    accuracies = episode_accuracies(trained.method, data, ways, shots, queries, episodes, seed)
    mean, ci = confidence_interval(accuracies)
    return {
        "method": config.method,
        "data": config.data,
        "protocol": config.split,
        "split": split,
        "ways": ways,
        "shots": shots,
        "episodes": len(accuracies),
        "accuracy": mean,
        "ci95": ci,
        "step": trained.step,
    }


def check_evaluated_ways(config: Config, ways: int):
    if config.method not in ("protonet", "matching", "relation", "siamese") and ways != config.ways:
        raise ConfigError(
            f"{config.method} was trained with a {config.ways}-way classifier; "
            f"it evaluates {config.ways}-way episodes only, got ways={ways}"
        )


# Lake et al.'s one-shot benchmark: people's accuracy (Lake et al. 2015) and
# Koch et al.'s Siamese network's (2015).
HUMAN_ONE_SHOT_ACCURACY = 95.5
KOCH_ONE_SHOT_ACCURACY = 92.0


def evaluate_one_shot_runs(path: Union[str, Path], runs: Union[str, Path], device: Optional[str] = None) -> Dict:
    """Accuracy of a run (folder or checkpoint) on Lake et al.'s 20 runs of
    20-way one-shot classification (:func:`~fastmeta.data.one_shot_runs`):
    per run, and over all the runs' test images."""
    trained = load_checkpoint(path, device)
    config = trained.config
    with data_errors("--oneshot-runs"):
        names, e = one_shot_runs(runs, config.image_size)
    ways = e.support.shape[1]
    check_evaluated_ways(config, ways)
    if trained.image_shape[0] != e.support.shape[2]:
        raise ConfigError(
            f"{config.method} was trained on {trained.image_shape[0]}-channel images; "
            f"the one-shot runs are greyscale characters"
        )
    e = Episode(*(field.to(config.device) for field in e))
    accuracies = query_accuracies(trained.method, e)
    mean, ci = confidence_interval(accuracies)
    return {
        "method": config.method,
        "data": config.data,
        "protocol": "lake-one-shot-runs",
        "runs_path": str(runs),
        "ways": ways,
        "shots": 1,
        "runs": {name: round(100 * accuracy, 4) for name, accuracy in zip(names, accuracies.tolist())},
        "accuracy": mean,
        "ci95": ci,
        "humans": HUMAN_ONE_SHOT_ACCURACY,
        "koch_siamese": KOCH_ONE_SHOT_ACCURACY,
        "step": trained.step,
    }
