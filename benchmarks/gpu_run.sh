#!/usr/bin/env bash
# Everything fastmeta checks on a lent GPU, in one call of under 10 minutes
# (see README, "On a GPU"): builds the CUDA extension, runs the test suite
# (CUDA cases included; a failing test is rerun with CUDA_LAUNCH_BLOCKING=1 to
# locate asynchronous faults), `fastmeta bench --device cuda` with JSON output,
# and compute-sanitizer's memcheck, racecheck, synccheck and initcheck on a
# small driver with PyTorch's caching allocator off (so an access past a
# buffer does not land inside a cached block). Every log goes to $OUT (or
# benchmarks/results/gpu-DATE); a short table of verdicts is printed last.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu-$(date +%Y-%m-%d)}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
rows=()
record() { rows+=("$(printf '%-26s %-6s %s' "$1" "$2" "$3")"); }

{
  date -u
  git rev-parse HEAD 2>/dev/null || echo "commit: unknown (no .git)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  nvcc --version | tail -1
} > "$OUT/environment.txt" 2>&1

if TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} \
    timeout 300 "$PY" -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1; then
  record build ok "$OUT/build.log"
else
  tail -40 "$OUT/build.log"
  echo "BUILD FAILED"
  exit 1
fi
"$PY" -m fastmeta info > "$OUT/info.txt" 2>&1

if timeout 240 "$PY" -m pytest -q -rfs tests > "$OUT/tests.log" 2>&1; then
  record tests ok "$(tail -1 "$OUT/tests.log")"
else
  record tests FAIL "$(tail -1 "$OUT/tests.log")"
  failed=$(grep -oE '^FAILED [^ ]+' "$OUT/tests.log" | cut -d' ' -f2 | head -20)
  if [ -n "$failed" ]; then
    # shellcheck disable=SC2086
    CUDA_LAUNCH_BLOCKING=1 timeout 120 "$PY" -m pytest -q -x $failed > "$OUT/tests-blocking.log" 2>&1
    record "failed, launch-blocking" rerun "$OUT/tests-blocking.log"
  fi
fi

# --no-compile: compiling every case's torch.compile baseline would take
# minutes of the short device time; correctness and the eager baselines first.
if timeout 120 "$PY" -m fastmeta bench --device cuda --all --no-compile --json "$OUT/bench_cuda.json" \
    > "$OUT/bench_cuda.txt" 2>&1; then
  record bench ok "$OUT/bench_cuda.txt"
else
  record bench FAIL "$OUT/bench_cuda.txt"
fi

for tool in memcheck racecheck synccheck initcheck; do
  if PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 120 compute-sanitizer --tool "$tool" \
      --error-exitcode 3 "$PY" benchmarks/sanitizer_driver.py > "$OUT/sanitizer-$tool.log" 2>&1; then
    record "sanitizer $tool" ok "$(tail -1 "$OUT/sanitizer-$tool.log")"
  else
    record "sanitizer $tool" FAIL "$(grep -m1 -E 'ERROR SUMMARY|Error|error' "$OUT/sanitizer-$tool.log")"
  fi
done

echo "== environment"; cat "$OUT/environment.txt"
echo "== info"; cat "$OUT/info.txt"
echo "== bench"; cat "$OUT/bench_cuda.txt"
echo "== verdicts (logs in $OUT)"
printf '%s\n' "${rows[@]}"
! printf '%s\n' "${rows[@]}" | grep -q ' FAIL '
