"""easyfsl's inference-time methods on a trained backbone: each method's
accuracy on the same 600 held-out episodes (mean and 95% confidence
interval), beside the prototypical classifier the backbone was trained with.

    fastmeta train protonet --data omniglot --ways 20 --shots 5 --out runs/protonet
    python examples/inference_time_methods.py runs/protonet --out results.json

The backbone of a `fastmeta train` run (any metric method's) embeds the
run's held-out classes once; every method then classifies the same episodes
of those features, batched over episodes (``score_episodes``). SimpleShot's
centring uses the mean feature of the run's training classes. FEAT's
attention module is first trained on episodes of the training classes'
features (the backbone stays frozen), one module per shot count.
"""

import argparse
import dataclasses
import json
import time

import torch

from fastmeta import load_checkpoint
from fastmeta.data import EpisodeSampler
from fastmeta.data.images import as_float_images
from fastmeta.nn import (
    BDCSPN,
    FEAT,
    PTMAP,
    TIM,
    Finetune,
    LaplacianShot,
    PrototypicalNetworks,
    SimpleShot,
    TransductiveFinetuning,
)
from fastmeta.training.run import confidence_interval, load_data, resolved_split


@torch.no_grad()
def embed(backbone, images, batch=500):
    return torch.cat([backbone(as_float_images(images[i : i + batch])) for i in range(0, len(images), batch)])


def train_feat(features, labels, ways, shots, queries, steps, seed):
    """FEAT with its attention module trained by Adam on batches of 32
    episodes of the frozen features ``(features, labels)``, the paper's
    squared distance as in the prototypical network the backbone comes from."""
    torch.manual_seed(seed)
    model = FEAT(feature_dimension=features.shape[1], metric="sqeuclidean")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    sampler = EpisodeSampler((features, labels), ways, shots, queries, episodes_per_batch=32, seed=seed)
    for _ in range(steps):
        e = sampler.sample()
        loss = model.loss(e.support, e.support_labels, e.query, e.query_labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def methods(train_mean):
    return {
        "ProtoNet (squared Euclidean)": PrototypicalNetworks(metric="sqeuclidean"),
        "SimpleShot (CL2N)": SimpleShot(feature_centering=train_mean, feature_normalization=2),
        "Finetune": Finetune(),
        "TransductiveFinetuning": TransductiveFinetuning(),
        "TIM": TIM(),
        "PT-MAP": PTMAP(),
        "BD-CSPN": BDCSPN(),
        "LaplacianShot": LaplacianShot(),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="a fastmeta train run folder (or checkpoint) of a metric method")
    parser.add_argument("--episodes", type=int, default=600)
    parser.add_argument("--ways", type=int, default=5)
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 5])
    parser.add_argument("--queries", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--feat-steps", type=int, default=2000, help="training steps of FEAT's attention module")
    parser.add_argument("--part", default="test", choices=["test", "val"], help="the held-out classes to test on")
    parser.add_argument("--out", help="write the results as JSON")
    args = parser.parse_args()

    trained = load_checkpoint(args.run)
    config = dataclasses.replace(trained.config, split=resolved_split(trained.config))
    backbone = trained.method.model.backbone.eval()
    test, train = load_data(config, args.part), load_data(config, "train")
    features = embed(backbone, test.images)
    train_features = embed(backbone, train.images)
    train_mean = train_features.mean(0)
    print(
        f"{config.method} backbone of {args.run} (step {trained.step}): {len(test.labels)} {args.part} images "
        f"of {test.num_classes} classes, {features.shape[1]} features"
    )

    results = []
    for shots in args.shots:
        sampler = EpisodeSampler(
            (features, test.labels), args.ways, shots, args.queries, episodes_per_batch=args.episodes, seed=args.seed
        )
        e = sampler.sample()
        start = time.perf_counter()
        feat = train_feat(train_features, train.labels, args.ways, shots, args.queries, args.feat_steps, args.seed)
        seconds = time.perf_counter() - start
        print(f"FEAT's attention trained for {shots}-shot: {args.feat_steps} steps, {seconds:.0f} s")
        for name, model in {**methods(train_mean), "FEAT": feat}.items():
            start = time.perf_counter()
            with torch.no_grad():
                scores = model.score_episodes(e.support, e.support_labels, e.query)
            seconds = time.perf_counter() - start
            accuracy, ci = confidence_interval((scores.argmax(-1) == e.query_labels).float().mean(1))
            results.append(
                {
                    "method": name,
                    "ways": args.ways,
                    "shots": shots,
                    "episodes": args.episodes,
                    "accuracy": accuracy,
                    "ci95": ci,
                    "seconds": seconds,
                }
            )
            print(
                f"{args.ways}-way {shots}-shot  {name:28s} {accuracy:6.2f} ± {ci:4.2f}   ({seconds:.1f} s)", flush=True
            )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(
                {
                    "run": str(args.run),
                    "data": config.data,
                    "split": config.split,
                    "part": args.part,
                    "step": trained.step,
                    "results": results,
                },
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
