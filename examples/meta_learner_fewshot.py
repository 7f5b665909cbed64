"""The LSTM meta-learner of Ravi & Larochelle (2017) on few-shot tasks drawn
from a generated dataset: each task is 5-way, with a random Gaussian cluster per
class in 16 dimensions, 5 support and 15 query points per class.

The meta-learner (fastmeta.nn.MetaLearnerLSTM, fused kernels) adapts a small MLP
classifier on the support set for T steps; the query loss after adaptation is
backpropagated into the meta-learner's LSTM, its gates and the learner's
learned initial parameters. Query accuracy on held-out tasks rises over
meta-training.

    python examples/meta_learner_fewshot.py [--meta-iterations 500]
"""

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

import fastmeta

WAYS, SHOTS, QUERIES, DIM = 5, 5, 15, 16


def sample_task(generator):
    centers = 0.6 * torch.randn(WAYS, DIM, generator=generator)

    def points(per_class):
        labels = torch.arange(WAYS).repeat_interleave(per_class)
        return centers[labels] + torch.randn(len(labels), DIM, generator=generator), labels

    return points(SHOTS), points(QUERIES)


def evaluate(meta, learner, tasks, steps):
    correct = total = 0
    for (xs, ys), (xq, yq) in tasks:
        params = meta.adapt(learner, xs, ys, F.cross_entropy, steps)
        with torch.no_grad():
            pred = torch.func.functional_call(learner, params, (xq,)).argmax(-1)
        correct += (pred == yq).sum().item()
        total += len(yq)
    return correct / total


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--meta-iterations", type=int, default=500)
    parser.add_argument("--steps", type=int, default=5, help="adaptation steps T")
    parser.add_argument("--meta-batch", type=int, default=4, help="tasks per meta-update")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)

    learner = nn.Sequential(nn.Linear(DIM, 32), nn.ReLU(), nn.Linear(32, WAYS))
    meta = fastmeta.nn.MetaLearnerLSTM(learner, hidden_size=20)
    opt = torch.optim.Adam(meta.parameters(), lr=1e-3)
    held_out = [sample_task(gen) for _ in range(100)]
    print(
        f"before meta-training: query accuracy {evaluate(meta, learner, held_out, args.steps):.3f} "
        f"(chance {1 / WAYS:.2f})"
    )
    start = time.perf_counter()
    for it in range(1, args.meta_iterations + 1):
        opt.zero_grad()
        for _ in range(args.meta_batch):
            (xs, ys), (xq, yq) = sample_task(gen)
            params = meta.adapt(learner, xs, ys, F.cross_entropy, args.steps)
            loss = F.cross_entropy(torch.func.functional_call(learner, params, (xq,)), yq)
            (loss / args.meta_batch).backward()
        nn.utils.clip_grad_norm_(meta.parameters(), 0.25)
        opt.step()
        if it % 50 == 0:
            acc = evaluate(meta, learner, held_out, args.steps)
            print(
                f"meta-iteration {it:5d}: held-out query accuracy {acc:.3f} ({time.perf_counter() - start:.0f} s)",
                flush=True,
            )


if __name__ == "__main__":
    main()
