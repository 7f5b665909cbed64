"""Plants one bug at a time in a copy of csrc/ and runs the emulated test of
its kernel file (``cuda_emulation/run COPY`` with TESTS set), to show what
catches each: the numbers, AddressSanitizer, ThreadSanitizer or the
emulator. Prints a Markdown table; exits non-zero if a bug got through.

Usage: python cuda_emulation/planted_bugs.py [NAME ...]   (default: every bug)
"""

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# name: (kind, file under csrc/cuda, text, replacement, test)
BUGS = {
    "prototypes-bound": ("off-by-one bound", "class_prototypes.cu", "if (i >= B * N * D) return;",
                         "if (i > B * N * D) return;", "class_prototypes"),
    "counts-atomic": ("atomic made plain", "class_prototypes.cu",
                      "atomicAdd(reinterpret_cast<unsigned long long*>(counts + b * N + c), 1ull);",
                      "counts[b * N + c] += 1;", "class_prototypes"),
    "contrastive-offset": ("wrong shuffle offset", "contrastive_loss.cu", "for (int offset = 16;",
                           "for (int offset = 8;", "contrastive_loss"),
    "contrastive-bound": ("off-by-one bound", "contrastive_loss.cu",
                          "if (i >= M) return;\n  const acc_t<T> d", "if (i > M) return;\n  const acc_t<T> d",
                          "contrastive_loss"),
    "similarity-sync": ("removed __syncthreads", "similarity_kernels.cuh",
                        "    __syncthreads();\n  }\n", "  }\n", "similarity"),
    "similarity-width": ("wrong shuffle offset or width", "similarity_kernels.cuh",
                         "v += __shfl_xor_sync(0xffffffffu, v, offset, kLanes)",
                         "v += __shfl_xor_sync(0xffffffffu, v, offset * 2, kLanes)", "similarity"),
    "similarity-early-return": ("early return before a full-mask shuffle", "similarity_forward.cu",
                                "const A t = group_sum(target_logit);\n    if (!valid_q) return;",
                                "if (!valid_q) return;\n    const A t = group_sum(target_logit);", "similarity"),
    "gnn-atomic": ("atomic made plain", "gnn_adjacency.cu", "atomicAdd(grad_nodes + at_i, v);",
                   "grad_nodes[at_i] += v;", "gnn_adjacency"),
    "gnn-bound": ("off-by-one bound", "gnn_adjacency.cu", "if (r >= count) return;\n  const int64_t per_episode",
                  "if (r > count) return;\n  const int64_t per_episode", "gnn_adjacency"),
    "mann-bound": ("off-by-one bound", "mann_memory.cu", "if (b >= a.B) return;\n  const MannSizes z = a.sizes;\n"
                   "  const int64_t S = z.S, W = z.W, H = z.H, TH = z.T * H;\n",
                   "if (b > a.B) return;\n  const MannSizes z = a.sizes;\n  const int64_t S = z.S, W = z.W, H = z.H, "
                   "TH = z.T * H;\n", "mann_memory"),
    "mlp-shared-size": ("shared memory one element too small", "mlp_task_derivatives.cu",
                        "global_workspace ? 0 : a.shape.workspace_size() * static_cast<int64_t>(sizeof(T));",
                        "global_workspace ? 0 : (a.shape.workspace_size() - 1) * static_cast<int64_t>(sizeof(T));",
                        "mlp_task_derivatives"),
    "l2o-shared-size": ("shared memory one element too small", "l2o_lstm_step.cu",
                        "kLstmThreads, plan.bytes, stream>>>(\n        lay, nw, plan",
                        "kLstmThreads, plan.bytes - sizeof(T), stream>>>(\n        lay, nw, plan", "l2o_lstm_step"),
    # (The barrier before the partials' write is redundant: accumulate_weight_grad ends with one.)
    "meta-sync": ("removed __syncthreads", "meta_lstm_step.cu",
                  "  load_shared(dw, static_cast<const T*>(nullptr), width);\n  __syncthreads();\n",
                  "  load_shared(dw, static_cast<const T*>(nullptr), width);\n", "meta_lstm_step"),
}


def caught_by(output: str, test: str):
    found = []
    for variant in ("plain", "asan", "tsan"):
        line = next((l for l in output.splitlines() if f"({variant})" in l and l.startswith("FAILED")), None)
        if line is None:
            continue
        log = ROOT / "build" / "cuda-emulate" / f"{test}-{variant}.log"
        text = log.read_text(errors="replace") if log.exists() else ""
        if variant == "asan" and ("AddressSanitizer" in text or "runtime error:" in text):
            found.append("ASan/UBSan")
        elif variant == "tsan" and "ThreadSanitizer" in text:
            found.append("TSan")
        elif "cuda_emulation:" in text:
            found.append(f"emulator ({variant})")
        elif re.search(r"\d+ passed, [1-9]\d* failed", text):
            found.append(f"numbers ({variant})")
        else:
            found.append(f"crash ({variant})")
    return found


def main(names):
    rows, missed = [], []
    for name in names or BUGS:
        kind, file, text, replacement, test = BUGS[name]
        with tempfile.TemporaryDirectory() as scratch:
            copy = Path(scratch) / "csrc"
            shutil.copytree(ROOT / "csrc", copy)
            path = copy / "cuda" / file
            source = path.read_text()
            if source.count(text) != 1:
                raise SystemExit(f"{name}: the text to replace is in {file} {source.count(text)} times")
            path.write_text(source.replace(text, replacement))
            result = subprocess.run([str(ROOT / "cuda_emulation" / "run"), str(copy)], cwd=ROOT,
                                    env={**os.environ, "TESTS": test}, capture_output=True, text=True)
        found = caught_by(result.stdout + result.stderr, test)
        if result.returncode == 0 or not found:
            missed.append(name)
        rows.append(f"| {kind} | `{file}` ({name}) | {', '.join(found) or '**not caught**'} |")
        print(rows[-1], flush=True)
    print("\n| bug planted | where | caught by |\n|---|---|---|\n" + "\n".join(rows))
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
