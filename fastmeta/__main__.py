"""The ``fastmeta`` command: ``fastmeta info`` and ``fastmeta bench``."""

import argparse
import os
import sys

import torch


def info() -> str:
    import fastmeta
    from fastmeta import _build_config

    build = fastmeta._C.build_info()
    lines = [
        f"fastmeta {fastmeta.__version__}",
        f"PyTorch {torch.__version__} (extension built against {_build_config.TORCH_VERSION})",
        f"CUDA in PyTorch: {torch.version.cuda or 'none'}; GPU available: {torch.cuda.is_available()}"
        + (f" ({torch.cuda.get_device_name()})" if torch.cuda.is_available() else ""),
        f"CUDA kernels compiled in: {'yes' if build['with_cuda'] else 'no'}"
        + (f", architectures: {_build_config.CUDA_ARCHS or 'PyTorch default'}" if build["with_cuda"] else ""),
        f"CPU kernels (similarity, LSTM, MLP families) use: {fastmeta._C.cpu_isa()} vector "
        "instructions (FASTMETA_CPU_ISA=avx2|baseline caps them)",
        "ops run on: CPU kernels for CPU tensors"
        + ("; CUDA kernels for CUDA tensors" if build["with_cuda"] else
           "; CUDA tensors are not supported by this build (rebuild with nvcc and a CUDA PyTorch)"),
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fastmeta", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, and whether CUDA kernels are compiled in")
    bench = sub.add_parser("bench", help="run the benchmark cases and print a table")
    bench.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    bench.add_argument("--case", action="append", dest="cases", metavar="NAME",
                       help="a case to run (repeatable); default: all")
    bench.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    bench.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")
    args = parser.parse_args(argv)

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
    names = args.cases or list(cases.CASES)
    try:
        rows = runner.run(names, args.device, memory=not args.no_memory)
    except ValueError as error:
        parser.error(str(error))
    machine = runner.machine()
    print(f"fastmeta bench on {args.device}: {machine['cpu']}"
          + (f", {machine['gpu']}" if args.device == "cuda"
             else f", {machine['threads']} threads, {machine['cpu_isa']} CPU kernels")
          + f", PyTorch {machine['torch']}, {machine['date']}")
    print(runner.format_table(rows))
    if args.json:
        runner.write_json(args.json, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
