"""Meta-trains a Prototypical or Relation network on few-shot character
classification and reports test accuracy as the papers do: the mean and 95%
confidence interval over 600 episodes of held-out characters.

Data: the built-in rendered characters (``--data chars``, no files needed) or
the official Omniglot files in ``$FASTMETA_DATA/omniglot`` (``--data
omniglot``, or ``omniglot:PATH``). Classes are split 70/10/20 into train /
validation / test characters; training characters are augmented with their
90/180/270-degree rotations as extra classes (Snell et al., Sung et al.).

    python examples/metric_fewshot.py --method protonet --data chars --steps 2000
"""

import argparse
import time
from pathlib import Path

import torch

from fastmeta.data import Characters, EpisodeSampler, Omniglot, data_dir
from fastmeta.nn import Conv4, PrototypicalNetworks, RelationNetworks
from fastmeta.training.run import confidence_interval

PAPER = {("protonet", 1): 98.8, ("protonet", 5): 99.7, ("relation", 1): 99.6, ("relation", 5): 99.8}


def load(data: str, split: str):
    rotations = split == "train"
    if data == "chars":
        return Characters(split=split, rotations=rotations)
    root = data.partition(":")[2] or data_dir() / "omniglot"
    return Omniglot(root, split=split, rotations=rotations)


def build(method: str) -> torch.nn.Module:
    if method == "protonet":
        return PrototypicalNetworks(Conv4(1), metric="sqeuclidean")
    return RelationNetworks(Conv4(1, pooled_blocks=2, flatten=False), feature_dimension=64)


@torch.no_grad()
def evaluate(model, data, ways: int, shots: int, episodes: int, seed: int):
    """Accuracy of each of ``episodes`` test episodes (15 queries per class)."""
    model.eval()
    sampler = EpisodeSampler(data, ways, shots, 15, episodes_per_batch=50, seed=seed)
    accuracies = []
    while len(accuracies) < episodes:
        e = sampler.sample()
        scores = model.score_episodes(e.support, e.support_labels, e.query, ways)
        accuracies += (scores.argmax(-1) == e.query_labels).float().mean(1).tolist()
    model.train()
    return torch.tensor(accuracies[:episodes])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", choices=["protonet", "relation"], default="protonet")
    parser.add_argument("--data", default="chars", help="chars, omniglot or omniglot:PATH")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument(
        "--ways", type=int, default=None, help="training ways (default 20 for protonet, 5 for relation)"
    )
    parser.add_argument("--shots", type=int, default=None, help="training shots (default 5 / 1)")
    parser.add_argument("--queries", type=int, default=None, help="training queries (5 / 19)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--test-episodes", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="append the results table here")
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    ways = args.ways or (20 if args.method == "protonet" else 5)
    shots = args.shots or (5 if args.method == "protonet" else 1)
    queries = args.queries or (5 if args.method == "protonet" else 19)

    train, test = load(args.data, "train"), load(args.data, "test")
    print(
        f"{args.method} on {args.data}: {train.num_classes} training classes (with rotations), "
        f"{test.num_classes} test characters; training {ways}-way {shots}-shot {queries}-query"
    )
    model = build(args.method)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    schedule = torch.optim.lr_scheduler.StepLR(optimizer, step_size=max(1, args.steps // 2), gamma=0.5)
    sampler = EpisodeSampler(train, ways, shots, queries, seed=args.seed)
    start, running = time.perf_counter(), None
    for step in range(1, args.steps + 1):
        e = sampler.sample()
        loss = model.loss(e.support, e.support_labels, e.query, e.query_labels, ways)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % max(1, args.steps // 10) == 0 or step == args.steps:
            print(f"step {step:5d}  loss {running:.4f}  {step / (time.perf_counter() - start):.1f} steps/s", flush=True)

    rows = []
    for test_shots in (1, 5):
        mean, half = confidence_interval(
            evaluate(model, test, 5, test_shots, args.test_episodes, seed=1000 + test_shots)
        )
        rows.append(
            f"| {args.method} | {args.data.split(':')[0]} | 5-way {test_shots}-shot | "
            f"{mean:.2f} ± {half:.2f} | {PAPER[(args.method, test_shots)]} |"
        )
    table = "\n".join(
        [
            f"| method | data | test episodes | accuracy % (95% CI, {args.test_episodes} episodes) | "
            "paper (Omniglot) |",
            "|---|---|---|---|---|",
            *rows,
        ]
    )
    print(table)
    if args.out:
        with open(args.out, "a") as f:
            f.write(
                f"\n{args.method} on {args.data}, {args.steps} steps of {ways}-way {shots}-shot "
                f"{queries}-query, seed {args.seed}, {time.strftime('%Y-%m-%d')}:\n\n{table}\n"
            )


if __name__ == "__main__":
    main()
