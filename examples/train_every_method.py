"""Meta-trains methods with `fastmeta train` settings and reports, per method
and data set, the 5-way 1-shot and 5-shot test accuracy (mean and 95%
confidence interval over 600 episodes of held-out classes) and the wall time
of the run. Each run's metrics.jsonl, metrics.png and config.json are kept in
OUT/<method>-<data>/ (the checkpoint too, unless --drop-checkpoints).

    python examples/train_every_method.py --methods protonet maml --data chars omniglot \\
        --out examples/results/train --steps protonet=1000 maml=300
"""

import argparse
import json
import time
from pathlib import Path

from fastmeta import training

# Training settings for 5-way test episodes on a 2-core CPU: each method's
# paper settings (fastmeta.training.METHODS) except where these say otherwise.
SETTINGS = {
    "protonet": dict(ways=20, shots=5, queries=5, lr_decay_every=500),
    "matching": dict(ways=5, shots=1, queries=15),
    "relation": dict(ways=5, shots=1, queries=19),
    "siamese": dict(ways=5, shots=1, queries=5),
    "maml": dict(ways=5, shots=1, queries=5, meta_batch=8),
    "fomaml": dict(ways=5, shots=1, queries=5, meta_batch=8),
    "metasgd": dict(ways=5, shots=1, queries=5, meta_batch=8),
    "imaml": dict(ways=5, shots=1, queries=5, meta_batch=8, inner_steps=8, test_inner_steps=8),
    "anil": dict(ways=5, shots=1, queries=5, meta_batch=8),
    "reptile": dict(ways=5, shots=1, queries=5, meta_batch=5),
    "meta-lstm": dict(ways=5, shots=1, queries=5, meta_batch=4),
    "gnn": dict(ways=5, shots=1, queries=1, meta_batch=32),
    "metanet": dict(ways=5, shots=1, queries=5, meta_batch=4),
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--data", nargs="+", default=["chars"], help="chars, omniglot, omniglot:PATH")
    parser.add_argument(
        "--steps", nargs="*", default=[], metavar="METHOD=N", help="training steps per method (default 1000)"
    )
    parser.add_argument("--episodes", type=int, default=600, help="test episodes per shot count")
    parser.add_argument("--out", type=Path, default=Path("examples/results/train"))
    parser.add_argument("--drop-checkpoints", action="store_true")
    args = parser.parse_args()
    steps = {m: 1000 for m in SETTINGS}
    steps.update({k: int(v) for k, v in (s.split("=") for s in args.steps)})
    table = args.out / "results.md"
    args.out.mkdir(parents=True, exist_ok=True)
    for data in args.data:
        for method in args.methods:
            run = args.out / f"{method}-{data.split(':')[0]}"
            config = training.make_config(
                method,
                data=data,
                steps=steps[method],
                validate_every=max(steps[method] // 5, 1),
                checkpoint_every=max(steps[method] // 5, 1),
                **SETTINGS[method],
            )
            begin = time.perf_counter()
            training.train(config, run, resume=(run / training.run.CHECKPOINT).exists())
            minutes = (time.perf_counter() - begin) / 60
            results = [training.evaluate(run, args.episodes, ways=5, shots=shots) for shots in (1, 5)]
            (run / "evaluation.json").write_text(json.dumps(results, indent=2) + "\n")
            cells = [f"{r['accuracy']:.2f} ± {r['ci95']:.2f}" for r in results]
            line = (
                f"| {method} | {data} | {config.ways}-way {config.shots}-shot, "
                f"{config.meta_batch} x {config.steps} | {cells[0]} | {cells[1]} | {minutes:.1f} |"
            )
            print(line, flush=True)
            if not table.exists():
                table.write_text(
                    "| method | data | training | 5-way 1-shot | 5-way 5-shot | minutes |\n|---|---|---|---|---|---|\n"
                )
            with open(table, "a") as f:
                f.write(line + "\n")
            if args.drop_checkpoints:
                (run / training.run.CHECKPOINT).unlink()


if __name__ == "__main__":
    main()
