#!/usr/bin/env bash
# Everything fastmeta checks on a lent GPU, in one call (see README, "On a GPU"):
# builds the CUDA extension, runs the test suite (CUDA cases included), runs
# `fastmeta bench --device cuda` with JSON output, and compute-sanitizer
# (memcheck) on a small driver. Full logs go to $OUT (or benchmarks/results/gpu-DATE);
# a short summary is printed last.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu-$(date +%Y-%m-%d)}
mkdir -p "$OUT"
PY=${PYTHON:-python3}

{
  date -u
  git rev-parse HEAD 2>/dev/null || echo "commit: unknown (no .git)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  nvcc --version | tail -1
} > "$OUT/environment.txt" 2>&1

status=0
TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} \
  "$PY" -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 || status=1
if [ $status -ne 0 ]; then
  tail -40 "$OUT/build.log"
  echo "BUILD FAILED"
  exit 1
fi
"$PY" -m fastmeta info > "$OUT/info.txt" 2>&1
"$PY" -m pytest -q -rs tests > "$OUT/tests.log" 2>&1 || status=1
"$PY" -m fastmeta bench --device cuda --json "$OUT/bench_cuda.json" > "$OUT/bench_cuda.txt" 2>&1 || status=1
compute-sanitizer --tool memcheck --error-exitcode 3 "$PY" benchmarks/sanitizer_driver.py \
  > "$OUT/sanitizer.log" 2>&1 || status=1

echo "== environment"; cat "$OUT/environment.txt"
echo "== info"; cat "$OUT/info.txt"
echo "== tests"; tail -5 "$OUT/tests.log"
echo "== bench"; cat "$OUT/bench_cuda.txt"
echo "== compute-sanitizer"; tail -3 "$OUT/sanitizer.log"
exit $status
