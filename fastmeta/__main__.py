"""The ``fastmeta`` command: ``info``, ``bench``, ``train`` and ``evaluate``."""

import argparse
import os
import sys
import warnings

import torch


def info() -> str:
    import fastmeta
    from fastmeta import _build_config
    from fastmeta.bench.runner import cpu_kernel_isas, format_cpu_kernel_isas

    build = fastmeta._C.build_info()
    lines = [
        f"fastmeta {fastmeta.__version__}",
        f"PyTorch {torch.__version__} (extension built against {_build_config.TORCH_VERSION})",
        f"CUDA in PyTorch: {torch.version.cuda or 'none'}; GPU available: {torch.cuda.is_available()}"
        + (f" ({torch.cuda.get_device_name()})" if torch.cuda.is_available() else ""),
        f"CUDA kernels compiled in: {'yes' if build['with_cuda'] else 'no'}"
        + (f", architectures: {_build_config.CUDA_ARCHS or 'PyTorch default'}" if build["with_cuda"] else ""),
        f"CPU kernels' vector instructions, by family: {format_cpu_kernel_isas(cpu_kernel_isas())} "
        "(FASTMETA_CPU_ISA=avx2|baseline caps the families compiled for several)",
        "ops run on: CPU kernels for CPU tensors"
        + (
            "; CUDA kernels for CUDA tensors"
            if build["with_cuda"]
            else "; CUDA tensors are not supported by this build (rebuild with nvcc and a CUDA PyTorch)"
        ),
    ]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastmeta", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, and whether CUDA kernels are compiled in")
    bench = sub.add_parser("bench", help="run the benchmark cases and print a table")
    bench.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    bench.add_argument(
        "--case",
        action="append",
        dest="cases",
        metavar="NAME",
        help="a case to run (repeatable); default: a representative subset (about 16 minutes on a 2-core CPU, "
        "a few without the torch.compile baselines)",
    )
    bench.add_argument("--all", action="store_true", help="run every case")
    bench.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    bench.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")
    bench.add_argument(
        "--no-compile", action="store_true", help="skip the torch.compile baselines (compiling takes seconds per case)"
    )
    add_train_parser(sub)
    add_evaluate_parser(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)

    if args.command in ("train", "evaluate"):
        with warnings.catch_warnings():
            warnings.showwarning = lambda message, *_, **__: print(
                f"fastmeta {args.command}: warning: {message}", file=sys.stderr
            )
            return run_training_command(args)
    if args.command == "info":
        print(info())
        return 0
    from fastmeta.bench import cases, runner

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no GPU is available")
    if args.json:
        folder = os.path.dirname(os.path.abspath(args.json))
        if not os.path.isdir(folder):
            parser.error(f"--json {args.json}: the folder {folder} does not exist")
        if not os.access(folder, os.W_OK):
            parser.error(f"--json {args.json}: the folder {folder} is not writable")
    names = list(cases.CASES) if args.all else args.cases or list(cases.DEFAULT_CASES)
    unknown = [n for n in names if n not in cases.CASES]
    if unknown:
        parser.error(f"unknown benchmark case(s) {unknown}; known: {sorted(cases.CASES)}")
    machine = runner.machine()
    print(
        f"fastmeta bench on {args.device}: {machine['cpu']}"
        + (f", {machine['gpu']}" if args.device == "cuda" else f", {machine['threads']} threads")
        + f", PyTorch {machine['torch']}, {machine['date']}"
    )
    if args.device == "cpu":
        print(f"CPU kernels: {runner.format_cpu_kernel_isas(machine['cpu_kernels'])}")
    print(f"cases: {', '.join(names)}" + ("" if args.all or args.cases else " (--all for every case)"))
    print(runner.format_header(), flush=True)
    rows = []
    for row in runner.run(names, args.device, memory=not args.no_memory, progress=True, compile=not args.no_compile):
        rows.append(row)
        print(runner.format_row(row), flush=True)
    if args.json:
        runner.write_json(args.json, rows)
    return 0


# flag: help; each is a Config field (dashes for underscores), whose type it takes
TRAIN_FLAGS = {
    "data": "chars (built-in, the default), omniglot[:PATH] or folder:PATH",
    "split": "which classes train, validate and test: auto (the default: the data's official split, else random), "
    "random, vinyals or lake (Omniglot), files (a folder's train/val/test CSV files or folders)",
    "ways": "classes per episode",
    "shots": "support examples per class",
    "queries": "query examples per class",
    "meta-batch": "tasks per step",
    "steps": "meta-training steps",
    "backbone": "conv4 or resnet12",
    "lr": "the meta-optimizer's learning rate (Adam)",
    "lr-decay-every": "halve the learning rate every this many steps (0: never)",
    "inner-lr": "MAML family, Reptile: the inner learning rate",
    "inner-steps": "inner steps in meta-training",
    "test-inner-steps": "inner steps at validation and test",
    "outer-lr": "Reptile: the step towards the adapted parameters",
    "lam": "iMAML: the proximal regularisation",
    "cg-steps": "iMAML: conjugate-gradient iterations",
    "device": "cpu, cuda or cuda:N",
    "seed": "the run's seed",
    "validate-every": "steps between validations",
    "val-episodes": "validation episodes",
    "checkpoint-every": "steps between checkpoints",
    "log-every": "steps between lines of metrics.jsonl",
    "image-size": "side of the square images",
}


def add_train_parser(sub):
    import dataclasses

    from fastmeta.training import METHODS, Config

    kinds = {f.name: f.type for f in dataclasses.fields(Config)}
    train = sub.add_parser("train", help="meta-train a method; resumable; runs under torchrun")
    train.add_argument("method", nargs="?", help=f"one of: {', '.join(METHODS)}")
    for flag, text in TRAIN_FLAGS.items():
        train.add_argument(f"--{flag}", type=kinds[flag.replace("-", "_")], help=text)
    train.add_argument("--config", metavar="FILE", help="a TOML file of settings (flags override it)")
    train.add_argument("--out", metavar="DIR", help="the run folder (default runs/METHOD-DATA-WAYSwSHOTSs)")
    train.add_argument("--resume", metavar="DIR", help="continue the run saved in DIR")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_evaluate_parser(sub):
    evaluate = sub.add_parser("evaluate", help="test accuracy of a run: mean and 95%% CI")
    evaluate.add_argument("run", help="a run folder or a checkpoint file")
    evaluate.add_argument("--episodes", type=int, default=600)
    evaluate.add_argument("--ways", type=int, help="default: the run's")
    evaluate.add_argument("--shots", type=int, help="default: the run's")
    evaluate.add_argument("--queries", type=int, default=15)
    evaluate.add_argument(
        "--split", choices=["test", "val", "train"], default="test", help="which part of the run's split to test on"
    )
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--device", help="default: the run's")
    evaluate.add_argument(
        "--oneshot-runs",
        metavar="PATH",
        help="instead, Lake et al.'s 20 runs of 20-way one-shot classification: all_runs.zip or its folder",
    )


def run_training_command(args) -> int:
    """``fastmeta train`` and ``fastmeta evaluate``: a bad configuration, data
    folder or checkpoint is one line on stderr and exit status 2."""

    def fail(message: str) -> int:
        print(f"fastmeta {args.command}: error: {message}", file=sys.stderr)
        return 2

    import dataclasses
    import json
    from pathlib import Path

    from fastmeta import training

    try:
        if args.command == "evaluate":
            if args.oneshot_runs is not None:
                result = run_one_shot_evaluation(args)
            else:
                result = training.evaluate(
                    args.run, args.episodes, args.ways, args.shots, args.queries, args.split, args.seed, args.device
                )
                print(
                    f"{result['method']} on {result['data']} ({result['protocol']} split), {result['split']} classes, "
                    f"{result['ways']}-way {result['shots']}-shot: {result['accuracy']:.2f}% "
                    f"+- {result['ci95']:.2f} (95% CI over {result['episodes']} episodes, "
                    f"step {result['step']})"
                )
            if Path(args.run).is_dir():
                with open(Path(args.run) / "evaluation.jsonl", "a") as f:
                    f.write(json.dumps(result) + "\n")
            return 0
        flags = {flag.replace("-", "_"): getattr(args, flag.replace("-", "_")) for flag in TRAIN_FLAGS}
        if args.resume:
            out = Path(args.resume)
            if out.is_file() and out.name == training.run.CHECKPOINT:
                out = out.parent  # the run folder of a checkpoint file
            for given, flag in ((args.config, "--config"), (args.out, "--out")):
                if given is not None:
                    return fail(
                        f"{flag} cannot be used with --resume: the run continues in {out} "
                        "with its config.json; give the values to change as flags"
                    )
            saved = training.run.read_checkpoint(out)["config"]
            if args.method not in (None, saved["method"]):
                return fail(f"{args.resume} is a {saved['method']} run, not {args.method}")
            config = training.config.checked({**saved, **{k: v for k, v in flags.items() if v is not None}})
        else:
            if args.method is None:
                return fail("give a METHOD, or --resume DIR")
            config = training.make_config(args.method, args.config, **flags)
            out = Path(
                args.out or f"runs/{config.method}-{config.data.partition(':')[0]}-{config.ways}w{config.shots}s"
            )
        blocking = next((p for p in (out, *out.parents) if p.exists() and not p.is_dir()), None)
        if blocking is not None:
            return fail(f"--out {out}: {blocking} is a file, not a folder")
        print(
            f"fastmeta train {config.method}: run folder {out}; "
            + ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(config).items() if k != "method")
        )
        trained = training.train(config, out, resume=bool(args.resume), progress=not args.no_progress)
        print(f"done: {trained.step} steps in {out}; test with fastmeta evaluate {out}")
        return 0
    except KeyboardInterrupt as stop:
        return 143 if str(stop) == "SIGTERM" else 130
    except (training.ConfigError, training.CheckpointError) as error:
        return fail(str(error).splitlines()[0])
    except OSError as error:  # a folder or file that cannot be created, read or written
        where = f"{error.filename}: " if error.filename else ""
        return fail(f"{where}{error.strerror or str(error).splitlines()[0]}")


def run_one_shot_evaluation(args) -> dict:
    """``fastmeta evaluate RUN --oneshot-runs PATH``: each run's accuracy,
    then the overall one beside people's and Koch et al.'s."""
    from fastmeta import training

    defaults = build_parser().parse_args(["evaluate", args.run])
    given = [f"--{name}" for name in ("episodes", "ways", "shots", "queries", "split", "seed")]
    given = [flag for flag in given if getattr(args, flag[2:]) != getattr(defaults, flag[2:])]
    if given:
        raise training.ConfigError(f"{', '.join(given)} cannot be used with --oneshot-runs: the runs fix the episodes")
    result = training.evaluate_one_shot_runs(args.run, args.oneshot_runs, args.device)
    for name, accuracy in result["runs"].items():
        print(f"{name}: {accuracy:.2f}%")
    print(
        f"{result['method']} on Lake et al.'s {len(result['runs'])} one-shot runs ({result['ways']}-way 1-shot): "
        f"{result['accuracy']:.2f}% +- {result['ci95']:.2f} (95% CI over the runs, step {result['step']}); "
        f"humans {result['humans']}%, Koch et al.'s Siamese network {result['koch_siamese']}%"
    )
    return result


if __name__ == "__main__":
    sys.exit(main())
