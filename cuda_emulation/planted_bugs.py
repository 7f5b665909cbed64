"""Plants one bug at a time in a copy of csrc/ and runs the emulated tests of
its kernel file (``cuda_emulation/run COPY`` with TESTS set), to show what
catches each: the numbers, a death test, AddressSanitizer, ThreadSanitizer or
the emulator. The variants run plain, then ASan, then TSan, up to the first
that reports more than a crash (all three with --every-variant). Prints a Markdown table; exits
non-zero if a bug got through.

Usage: python cuda_emulation/planted_bugs.py [--every-variant] [NAME ...]   (default: every bug)
"""

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "build" / "cuda-emulate-planted"  # not make cuda-emulate's folder: both can run at once

# The six kinds of bug the suite must catch, and the findings of the desk
# review made before the emulation existed, put back. A kind absent from a
# file has no row for it: class_prototypes.cu, gnn_adjacency.cu and
# mann_memory.cu have no barrier, shuffle or shared memory;
# contrastive_loss.cu no barrier or shared memory; the LSTM and MLP files no
# shuffle; only class_prototypes.cu and gnn_adjacency.cu have atomics.
BOUND, SYNC, ATOMIC, SHUFFLE = (
    "off-by-one bound",
    "removed __syncthreads",
    "atomic made plain",
    "wrong shuffle offset or width",
)
EARLY, SHARED = "early return before a full-mask shuffle", "shared memory one element (or row) too small"
LSTM = "l2o_lstm_step meta_lstm_step"

# name: (kind, file under csrc/cuda, text, replacement, test programs)
BUGS = {
    "prototypes-bound": (
        BOUND,
        "class_prototypes.cu",
        "if (i >= B * N * D) return;",
        "if (i > B * N * D) return;",
        "class_prototypes",
    ),
    "members-bound": (
        BOUND,
        "class_prototypes.cu",
        "if (i >= B * N) return;",
        "if (i > B * N) return;",
        "class_prototypes",
    ),
    "counts-atomic": (
        ATOMIC,
        "class_prototypes.cu",
        "atomicAdd(reinterpret_cast<unsigned long long*>(counts + b * N + c), 1ull);",
        "counts[b * N + c] += 1;",
        "class_prototypes",
    ),
    "contrastive-offset": (
        SHUFFLE,
        "contrastive_loss.cu",
        "for (int offset = 16;",
        "for (int offset = 8;",
        "contrastive_loss",
    ),
    "contrastive-width": (
        SHUFFLE,
        "contrastive_loss.cu",
        "__shfl_xor_sync(0xffffffffu, sum, offset)",
        "__shfl_xor_sync(0xffffffffu, sum, offset, 16)",
        "contrastive_loss",
    ),
    "contrastive-early-return": (
        EARLY,
        "contrastive_loss.cu",
        "  acc_t<T> sum = 0;\n",
        "  acc_t<T> sum = 0;\n  if (lane >= D) return sum;\n",
        "contrastive_loss",
    ),
    "contrastive-bound": (
        BOUND,
        "contrastive_loss.cu",
        "if (i >= M) return;\n  const acc_t<T> d",
        "if (i > M) return;\n  const acc_t<T> d",
        "contrastive_loss",
    ),
    "contrastive-backward-bound": (
        BOUND,
        "contrastive_loss.cu",
        "if (i >= M) return;\n  const A d",
        "if (i > M) return;\n  const A d",
        "contrastive_loss",
    ),
    "row-stats-bound": (
        BOUND,
        "similarity_forward.cu",
        "if (row >= x_rows + a.B * a.N) return;",
        "if (row > x_rows + a.B * a.N) return;",
        "similarity",
    ),
    "similarity-forward-sync": (
        SYNC,
        "similarity_forward.cu",
        "        __syncthreads();\n        A* o = out",
        "        A* o = out",
        "similarity",
    ),
    "similarity-early-return": (
        EARLY,
        "similarity_forward.cu",
        "const A t = group_sum(target_logit);\n    if (!valid_q) return;",
        "if (!valid_q) return;\n    const A t = group_sum(target_logit);",
        "similarity",
    ),
    "similarity-backward-bound": (
        BOUND,
        "similarity_backward.cu",
        "const bool valid_own = own < own_count;",
        "const bool valid_own = own <= own_count;",
        "similarity",
    ),
    "similarity-backward-sync": (
        SYNC,
        "similarity_backward.cu",
        "    __syncthreads();\n    accumulate_weighted_rows(smem, other_rows",
        "    accumulate_weighted_rows(smem, other_rows",
        "similarity",
    ),
    "similarity-backward-early-return": (
        EARLY,
        "similarity_backward.cu",
        "  stat_grad = group_sum(stat_grad);\n  scale_grad = group_sum(scale_grad);\n  if (!valid_own) return;\n",
        "  if (!valid_own) return;\n  stat_grad = group_sum(stat_grad);\n  scale_grad = group_sum(scale_grad);\n",
        "similarity",
    ),
    "probs-shared-size": (
        SHARED,
        "similarity_backward.cu",
        "__shared__ A probs[kRows][kCols + 1];",
        "__shared__ A probs[kRows - 1][kCols + 1];",
        "similarity",
    ),
    "similarity-sync": (SYNC, "similarity_kernels.cuh", "    __syncthreads();\n  }\n", "  }\n", "similarity"),
    "similarity-width": (
        SHUFFLE,
        "similarity_kernels.cuh",
        "v += __shfl_xor_sync(0xffffffffu, v, offset, kLanes)",
        "v += __shfl_xor_sync(0xffffffffu, v, offset * 2, kLanes)",
        "similarity",
    ),
    "similarity-max-width": (
        SHUFFLE,
        "similarity_kernels.cuh",
        "nan_max(__shfl_xor_sync(0xffffffffu, v, offset, kLanes), v)",
        "nan_max(__shfl_xor_sync(0xffffffffu, v, offset, kLanes / 2), v)",
        "similarity",
    ),
    "dot-tile-bound": (
        BOUND,
        "similarity_kernels.cuh",
        "(c0 + cc < num_cols && d0 + dd < D)",
        "(c0 + cc < num_cols && d0 + dd <= D)",
        "similarity",
    ),
    "tile-shared-size": (
        SHARED,
        "similarity_kernels.cuh",
        "A weights[kRows][kCols + 1];",
        "A weights[kRows - 1][kCols + 1];",
        "similarity",
    ),
    "gnn-atomic": (
        ATOMIC,
        "gnn_adjacency.cu",
        "atomicAdd(grad_nodes + at_i, v);",
        "grad_nodes[at_i] += v;",
        "gnn_adjacency",
    ),
    "gnn-bound": (
        BOUND,
        "gnn_adjacency.cu",
        "if (r >= count) return;\n  const int64_t per_episode",
        "if (r > count) return;\n  const int64_t per_episode",
        "gnn_adjacency",
    ),
    "gnn-rows-bound": (
        BOUND,
        "gnn_adjacency.cu",
        "if (row >= a.B * a.n) return;\n  adjacency_row(",
        "if (row > a.B * a.n) return;\n  adjacency_row(",
        "gnn_adjacency",
    ),
    "mann-bound": (
        BOUND,
        "mann_memory.cu",
        "if (b >= a.B) return;\n  const MannSizes z = a.sizes;\n"
        "  const int64_t S = z.S, W = z.W, H = z.H, TH = z.T * H;\n",
        "if (b > a.B) return;\n  const MannSizes z = a.sizes;\n  const int64_t S = z.S, W = z.W, H = z.H, "
        "TH = z.T * H;\n",
        "mann_memory",
    ),
    "mann-backward-bound": (
        BOUND,
        "mann_memory.cu",
        "if (b >= a.B) return;\n  const MannSizes z = a.sizes;\n"
        "  const int64_t S = z.S, W = z.W, H = z.H, TH = z.T * H, n",
        "if (b > a.B) return;\n  const MannSizes z = a.sizes;\n"
        "  const int64_t S = z.S, W = z.W, H = z.H, TH = z.T * H, n",
        "mann_memory",
    ),
    "mlp-shared-size": (
        SHARED,
        "mlp_task_derivatives.cu",
        "global_workspace ? 0 : a.shape.workspace_size() * static_cast<int64_t>(sizeof(T));",
        "global_workspace ? 0 : (a.shape.workspace_size() - 1) * static_cast<int64_t>(sizeof(T));",
        "mlp_task_derivatives",
    ),
    "mlp-sync": (
        SYNC,
        "mlp_task_derivatives.cu",
        "__device__ void sync() { __syncthreads(); }",
        "__device__ void sync() {}",
        "mlp_task_derivatives",
    ),
    "mlp-bound": (
        BOUND,
        "mlp_task_derivatives.cu",
        "e < N * n_out; e += blockDim.x",
        "e <= N * n_out; e += blockDim.x",
        "mlp_task_derivatives",
    ),
    "l2o-shared-size": (
        SHARED,
        "l2o_lstm_step.cu",
        "kLstmThreads, plan.bytes, stream>>>(\n        lay, nw, plan",
        "kLstmThreads, plan.bytes - sizeof(T), stream>>>(\n        lay, nw, plan",
        "l2o_lstm_step",
    ),
    "l2o-sync": (
        SYNC,
        "l2o_lstm_step.cu",
        "  Column<T> h{c.base + H * kLstmThreads};\n  __syncthreads();\n  const int64_t p",
        "  Column<T> h{c.base + H * kLstmThreads};\n  const int64_t p",
        "l2o_lstm_step",
    ),
    "l2o-bound": (BOUND, "l2o_lstm_step.cu", "if (p >= lay.P) return;", "if (p > lay.P) return;", "l2o_lstm_step"),
    "meta-sync": (
        SYNC,
        "meta_lstm_step.cu",
        "  load_shared(dw, static_cast<const T*>(nullptr), width);\n  __syncthreads();\n",
        "  load_shared(dw, static_cast<const T*>(nullptr), width);\n",
        "meta_lstm_step",
    ),
    "meta-bound": (BOUND, "meta_lstm_step.cu", "if (p >= P) return;", "if (p > P) return;", "meta_lstm_step"),
    "meta-shared-size": (
        SHARED,
        "meta_lstm_step.cu",
        "blocks_for(a.P, kLstmThreads), kLstmThreads, bytes, stream",
        "blocks_for(a.P, kLstmThreads), kLstmThreads, bytes - sizeof(T), stream",
        "meta_lstm_step",
    ),
    "lstm-sync": (
        SYNC,
        "lstm_kernels.cuh",
        "  __syncthreads();\n  for (int w = threadIdx.x;",
        "  for (int w = threadIdx.x;",
        LSTM,
    ),
    "lstm-bound": (BOUND, "lstm_kernels.cuh", "if (w >= width) return;", "if (w > width) return;", LSTM),
    # The desk review's findings, put back. (Finding 1, NaN losing the row
    # maximum, is no longer a bug to plant: a row whose maximum is -inf has a
    # NaN softmax, so a NaN row comes out NaN with either maximum.)
    "review-2-row-norm-order": (
        "review finding 2: row norms summed in another order",
        "similarity_forward.cu",
        "sum_squares = fma(value, value, sum_squares);",
        "sum_squares += value * value;",
        "similarity",
    ),
    "review-4-unchecked-label": (
        "review finding 4: labels unchecked",
        "class_prototypes.cu",
        '    FASTMETA_DEVICE_ASSERT(c >= 0 && c < N && "class_prototypes: a label is out of range");\n',
        "",
        "class_prototypes",
    ),
    "review-5a-zero-factor": (
        "review finding 5a: 0 * inf in the row-statistic term",
        "similarity_backward.cu",
        "if (factor != A(0))",
        "if (true)",
        "similarity",
    ),
    "review-5b-padding-lanes": (
        "review finding 5b: padding lanes preprocess g = 0",
        "l2o_lstm_step.cu",
        "  if (active)\n    prep.features(grad[p], xh[0], xh[1]);\n  else\n    xh[0] = xh[1] = T(0);\n",
        "  prep.features(active ? grad[p] : T(0), xh[0], xh[1]);\n",
        "l2o_lstm_step",
    ),
}


def caught_by(output: str, tests: str, variant: str):
    """What reported the bug in the output of one variant's run, if anything."""
    found = []
    for test in tests.split():
        if any(line.startswith(f"FAILED: {test} --death") for line in output.splitlines()):
            found.append("a death test")
        if not any(line.startswith(f"FAILED: {test} ({variant})") for line in output.splitlines()):
            continue
        text = (OUT / f"{test}-{variant}.log").read_text(errors="replace")
        if variant == "asan" and ("AddressSanitizer" in text or "runtime error:" in text):
            found.append("ASan/UBSan")
        elif variant == "tsan" and "ThreadSanitizer" in text:
            found.append("TSan")
        elif "cuda_emulation:" in text:
            found.append(f"the emulator ({variant})")
        elif re.search(r"\d+ passed, [1-9]\d* failed", text):
            found.append(f"the numbers ({variant})")
        else:
            found.append(f"a crash ({variant})")
    return list(dict.fromkeys(found))


def main(names, every_variant):
    rows, missed = [], []
    for name in names or BUGS:
        kind, file, text, replacement, tests = BUGS[name]
        found = []
        with tempfile.TemporaryDirectory() as scratch:
            copy = Path(scratch) / "csrc"
            shutil.copytree(ROOT / "csrc", copy)
            path = copy / "cuda" / file
            source = path.read_text()
            if source.count(text) != 1:
                raise SystemExit(f"{name}: the text to replace is in {file} {source.count(text)} times")
            path.write_text(source.replace(text, replacement))
            for variant in ("plain", "asan", "tsan"):
                result = subprocess.run(
                    [str(ROOT / "cuda_emulation" / "run"), str(copy)],
                    cwd=ROOT,
                    env={**os.environ, "TESTS": tests, "VARIANTS": variant, "CUDA_EMULATE_OUT": str(OUT)},
                    capture_output=True,
                    text=True,
                )
                if result.returncode != 0:
                    reports = caught_by(result.stdout + result.stderr, tests, variant) or [f"a failure ({variant})"]
                    found += reports
                    # A bare crash says little: the sanitizers name the fault.
                    if not every_variant and not all(r.startswith("a crash") for r in reports):
                        break
        if not found:
            missed.append(name)
        rows.append(f"| {kind} | `{file}` ({name}) | {', '.join(found) or '**not caught**'} |")
        print(rows[-1], flush=True)
    print("\n| bug planted | where | caught by |\n|---|---|---|\n" + "\n".join(rows))
    return 1 if missed else 0


if __name__ == "__main__":
    arguments = sys.argv[1:]
    every = "--every-variant" in arguments
    sys.exit(main([a for a in arguments if a != "--every-variant"], every))
