"""MAML and iMAML on few-shot characters: test accuracy as the papers report
it, and MAML's wall time to a validation accuracy with fastmeta's batched
engine (BatchedMAML) against the per-task loop that learn2learn and higher
run (fastmeta.algorithms.MAML: clone, adapt, query loss, task by task).

Both MAML runs train the same Conv4 learner (batch norm on each task's batch,
a linear 5-way head) from the same initialisation on the same tasks: 5-way
1-shot, 5 queries per class, 8 tasks per step, one inner step of 0.4, Adam
1e-3; they compute the same exact second-order meta-gradient. iMAML takes 8
proximal inner steps of 0.1, lam 2, 5 conjugate-gradient steps.
Validation every ``--validate-every`` steps on 100 held-out episodes (3 inner
steps, iMAML 8) is not counted in the wall time. Test: 600 episodes of 5-way
1-shot, 15 queries per class, from held-out characters.

    python examples/maml_fewshot.py --data chars --steps 300 --target 85
"""

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fastmeta.algorithms import MAML, BatchedMAML, iMAML
from fastmeta.data import EpisodeSampler
from fastmeta.nn import Conv4
from fastmeta.training import make_config
from fastmeta.training.methods import batch_statistics_only
from fastmeta.training.run import confidence_interval, load_data

PAPER = {"MAML": 98.7, "iMAML": 99.50}  # Finn et al. 2017; Rajeswaran et al. 2019 (Omniglot 5-way 1-shot)
TASKS, WAYS = 8, 5


def load(data: str, split: str):
    return load_data(make_config("maml", data=data), split)


def learner(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(batch_statistics_only(Conv4(1)), nn.Linear(64, WAYS))


@torch.no_grad()
def accuracies(model, data, episodes: int, steps: int, queries: int, seed: int) -> torch.Tensor:
    """Each episode's query accuracy after ``steps`` inner steps."""
    sampler = EpisodeSampler(data, WAYS, 1, queries, episodes_per_batch=20, seed=seed)
    out = []
    while len(out) < episodes:
        e = sampler.sample()
        predicted = model.predict(e.support, e.support_labels, e.query, steps).argmax(-1)
        out += (predicted == e.query_labels).float().mean(1).tolist()
    return torch.tensor(out[:episodes]) * 100


def train(kind: str, train_data, val_data, args):
    """Meta-trains one way; returns the model that predicts and the
    validation history ``[(step, seconds, accuracy)]``."""
    net = learner(args.seed)
    if kind == "iMAML":
        model = iMAML(net, 0.1, 8, lam=2.0, cg_steps=5, loss="cross_entropy")
        evaluator, test_steps = model, 8
    else:
        model = BatchedMAML(net, 0.4, 1, loss="cross_entropy")
        evaluator, test_steps = model, 3
        if kind == "MAML, per-task loop":
            model = MAML(net, lr=0.4)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    sampler = EpisodeSampler(train_data, WAYS, 1, 5, episodes_per_batch=TASKS, seed=args.seed)
    seconds, history = 0.0, []
    for step in range(1, args.steps + 1):
        e = sampler.sample()
        begin = time.perf_counter()
        optimizer.zero_grad()
        if isinstance(model, MAML):
            for t in range(TASKS):
                task = model.clone()
                task.adapt(F.cross_entropy(task(e.support[t]), e.support_labels[t]))
                (F.cross_entropy(task(e.query[t]), e.query_labels[t]) / TASKS).backward()
        else:
            model(e.support, e.support_labels, e.query, e.query_labels).backward()
        optimizer.step()
        seconds += time.perf_counter() - begin
        if step % args.validate_every == 0 or step == args.steps:
            accuracy = accuracies(evaluator, val_data, 100, test_steps, 5, seed=1).mean().item()
            history.append((step, seconds, accuracy))
            print(f"{kind:22s} step {step:5d}  {seconds:7.1f} s  validation {accuracy:5.1f}%", flush=True)
    return evaluator, test_steps, history


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="chars", help="chars, omniglot or omniglot:PATH")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--imaml-steps", type=int, default=150)
    parser.add_argument("--validate-every", type=int, default=25)
    parser.add_argument("--target", type=float, default=85.0, help="validation accuracy (%%) to time")
    parser.add_argument("--test-episodes", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="append the results here")
    args = parser.parse_args(argv)
    train_data, val_data, test_data = (load(args.data, s) for s in ("train", "val", "test"))
    rows, timing = [], []
    for kind in ("MAML", "MAML, per-task loop", "iMAML"):
        steps = args.steps
        if kind == "iMAML":
            args.steps = args.imaml_steps
        model, test_steps, history = train(kind, train_data, val_data, args)
        args.steps = steps
        reached = next(((s, t) for s, t, a in history if a >= args.target), None)
        timing.append(
            f"| {kind} | {history[-1][1] / history[-1][0]:.3f} | "
            + (f"{reached[1]:.1f} (step {reached[0]})" if reached else "not reached")
            + " |"
        )
        if kind != "MAML, per-task loop":  # the same meta-gradients as MAML's
            mean, half = confidence_interval(
                accuracies(model, test_data, args.test_episodes, test_steps, 15, seed=1000) / 100
            )
            rows.append(
                f"| {kind} | {args.data.split(':')[0]} | {history[-1][0]} x {TASKS} tasks | "
                f"{mean:.2f} ± {half:.2f} | {PAPER[kind]} |"
            )
    table = "\n".join(
        [
            "| method | data | training steps | 5-way 1-shot accuracy % (95% CI) | paper, Omniglot |",
            "|---|---|---|---|---|",
            *rows,
            "",
            f"| MAML training | seconds per step | seconds to {args.target:g}% validation |",
            "|---|---|---|",
            *timing,
        ]
    )
    print(table)
    if args.out:
        with open(args.out, "a") as f:
            f.write(f"\nMAML and iMAML on {args.data}, seed {args.seed}, {time.strftime('%Y-%m-%d')}:\n\n{table}\n")


if __name__ == "__main__":
    main()
