"""Meta-trains a memory-augmented neural network (Santoro et al. 2016) on
sequences of 5 characters x 10 examples and reports, as the paper's table
does, the accuracy at the 1st, 2nd, 3rd, 5th and 10th presentation of a
class, on held-out characters (mean and 95% confidence interval over 600
test episodes).

Data: the built-in rendered characters (``--data chars``) or the official
Omniglot files in ``$FASTMETA_DATA/omniglot`` (``--data omniglot`` or
``omniglot:PATH``), at 20x20 as in the paper; training characters with their
rotations as extra classes.

    python examples/mann_fewshot.py --data chars --steps 10000
"""

import argparse
import time
from pathlib import Path

import torch

from fastmeta.data import EpisodeSampler
from fastmeta.nn import MANN
from fastmeta.training import make_config
from fastmeta.training.run import confidence_interval, load_data

INSTANCES = (1, 2, 3, 5, 10)
PAPER = {1: 36.4, 2: 82.8, 3: 91.0, 5: 92.6, 10: 94.9}  # Santoro et al. 2016, Table 1 (MANN, 5 classes)


def load(data: str, split: str):
    return load_data(make_config("mann", data=data, image_size=20), split)


def sequences(sampler: EpisodeSampler, generator: torch.Generator):
    """A batch of episodes as shuffled sequences ``[B, ways*10, 1, 20, 20]``
    and their labels."""
    e = sampler.sample()
    order = torch.rand(e.support_labels.shape, generator=generator).argsort(1)
    images = e.support.gather(1, order[..., None, None, None].expand_as(e.support))
    return images, e.support_labels.gather(1, order)


def presentation(labels: torch.Tensor) -> torch.Tensor:
    """How many times each step's class has been shown, this step included."""
    one_hot = torch.nn.functional.one_hot(labels)
    return (one_hot.cumsum(1) * one_hot).sum(-1)


@torch.no_grad()
def evaluate(model, data, episodes: int, seed: int):
    """Per-episode accuracy at each presentation in INSTANCES: ``[episodes, len(INSTANCES)]``."""
    model.eval()
    sampler = EpisodeSampler(data, 5, 10, 0, episodes_per_batch=50, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    rows = []
    while len(rows) < episodes:
        images, labels = sequences(sampler, generator)
        correct = (model(images, labels).argmax(-1) == labels).float()
        seen = presentation(labels)
        rows += torch.stack([(correct * (seen == k)).sum(1) / (seen == k).sum(1) for k in INSTANCES], 1).tolist()
    model.train()
    return torch.tensor(rows[:episodes])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="chars", help="chars, omniglot or omniglot:PATH")
    parser.add_argument("--steps", type=int, default=10000, help="batches of 16 episodes")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--test-episodes", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="append the results table here")
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    train, test = load(args.data, "train"), load(args.data, "test")
    print(
        f"MANN on {args.data}: {train.num_classes} training classes (with rotations), "
        f"{test.num_classes} test characters; 16 sequences of 5 classes x 10 per step",
        flush=True,
    )
    model = MANN(input_size=400, num_classes=5)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    sampler = EpisodeSampler(train, 5, 10, 0, episodes_per_batch=16, seed=args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    start, running = time.perf_counter(), None
    for step in range(1, args.steps + 1):
        images, labels = sequences(sampler, generator)
        loss = model.loss(images, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % max(1, args.steps // 20) == 0 or step == args.steps:
            print(f"step {step:6d}  loss {running:.4f}  {step / (time.perf_counter() - start):.1f} steps/s", flush=True)

    accuracy = evaluate(model, test, args.test_episodes, seed=1000)
    cells = [confidence_interval(accuracy[:, i]) for i in range(len(INSTANCES))]
    table = "\n".join(
        [
            "| | "
            + " | ".join(f"{k}{'st' if k == 1 else 'nd' if k == 2 else 'rd' if k == 3 else 'th'}" for k in INSTANCES)
            + " |",
            "|---|" + "---|" * len(INSTANCES),
            f"| fastmeta MANN, {args.data.split(':')[0]} ({args.steps} steps) | "
            + " | ".join(f"{m:.1f} ± {h:.1f}" for m, h in cells)
            + " |",
            "| Santoro et al. 2016, Omniglot (100,000 episodes) | "
            + " | ".join(str(PAPER[k]) for k in INSTANCES)
            + " |",
        ]
    )
    print(table)
    if args.out:
        with open(args.out, "a") as f:
            f.write(
                f"\nMANN on {args.data}, {args.steps} steps of 16 episodes, seed {args.seed}, "
                f"{time.strftime('%Y-%m-%d')}; accuracy % at each presentation of a class "
                f"(95% CI over {args.test_episodes} test episodes):\n\n{table}\n"
            )


if __name__ == "__main__":
    main()
