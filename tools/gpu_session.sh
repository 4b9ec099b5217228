#!/usr/bin/env bash
# The first GPU run, as one call of the device tool (15 minutes of device time per session, 10 per
# call): build for Hopper, the CUDA tests, compute-sanitizer, then the CUDA benchmarks (decode, prefill, KV ops, training), each stage
# under its own time budget so one slow stage cannot eat the next. Logs go to $OUT (at most 8 files
# come back): env.txt, build.log, tests.log, sanitizer.log, bench.md, summary.txt. Usage there:
#   OUT=... bash tools/gpu_session.sh [stages]     stages: any of build,tests,sanitizer,bench (all)
# Budgets (seconds) can be changed by the BUDGET_* variables below. A stage that runs out of time is reported
# as TIMEOUT in summary.txt, and the next one still runs.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-build/gpu_session}
mkdir -p "$OUT"
PYTHON=${PYTHON:-python3}
STAGES=${1:-build,tests,sanitizer,bench}
export PYTHONUNBUFFERED=1
summary=$OUT/summary.txt
: > "$summary"

# stage NAME BUDGET LOG COMMAND...: runs COMMAND under `timeout`, appending to LOG; one summary line.
stage() {
  local name=$1 budget=$2 log=$3
  shift 3
  [[ ",$STAGES," == *",$name,"* ]] || return 0
  local start=$SECONDS rc=0
  echo "== $name (budget ${budget}s): $*" | tee -a "$log"
  timeout --signal=INT --kill-after=15 "$budget" "$@" >>"$log" 2>&1 || rc=$?
  local verdict=ok
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then verdict=TIMEOUT
  elif [ "$rc" -ne 0 ]; then verdict="FAILED (exit $rc)"; fi
  printf '%-10s %-20s %4d s  %s\n' "$name" "$verdict" $((SECONDS - start)) "$*" | tee -a "$summary"
  return "$rc"
}

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
  nvcc --version | tail -n 2
  "$PYTHON" -c 'import torch, sys; print(sys.version.split()[0], "torch", torch.__version__,
    "cuda", torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else "-")'
  "$PYTHON" -c 'import transformers; print("transformers", transformers.__version__)' || true
  command -v compute-sanitizer ncu cuobjdump || true
  nproc
} > "$OUT/env.txt" 2>&1

# 1. Build: sm_90a only (Hopper), every core; the per-file ptxas report goes to the log.
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a} KV_PAGED_CUDA=1
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
stage build "${BUDGET_BUILD:-300}" "$OUT/build.log" \
  "$PYTHON" -m pip install --no-build-isolation --no-deps -e . || {
  [[ ",$STAGES," != *",build,"* ]] || { echo "build failed: nothing else can run" | tee -a "$summary"; exit 1; }
}
"$PYTHON" -c 'import kv_paged; assert kv_paged.with_cuda, "kv_paged was built without CUDA"' \
  >>"$OUT/build.log" 2>&1 || echo "warning: kv_paged reports no CUDA kernels" | tee -a "$summary"

# 2. Tests: every CUDA kernel test and the placement tests, then the op tests on the GPU's
#    device parametrisations (the CPU ones ran in CI already).
stage tests "${BUDGET_TESTS_CUDA:-150}" "$OUT/tests.log" \
  "$PYTHON" -m pytest -q -rfEs -p no:cacheprovider tests/test_cuda_kernels.py \
  tests/test_cuda_placement.py
stage tests "${BUDGET_TESTS_OPS:-120}" "$OUT/tests.log" \
  "$PYTHON" -m pytest -q -rfEs -p no:cacheprovider -k cuda tests/test_paged_attention.py \
  tests/test_flash_attention.py tests/test_flash_attention_backward.py \
  tests/test_cascade_attention.py tests/test_reshape_and_cache.py tests/test_copy_blocks.py \
  tests/test_ops_smoke.py

# 3. compute-sanitizer memcheck + racecheck on the small CUDA kernel cases.
stage sanitizer "${BUDGET_SANITIZER:-150}" "$OUT/sanitizer.log" env PYTHON="$PYTHON" bash tools/memcheck.sh

# 4. Benchmarks, side by side with the peers and the measured roofs (copy bandwidth, bf16 matmul),
#    each appending its table to bench.md.
bench=$OUT/bench.md
stage bench "${BUDGET_BENCH_DECODE:-120}" "$OUT/bench.log" \
  "$PYTHON" benchmarks/bench_attention.py --device cuda --out "$bench"
stage bench "${BUDGET_BENCH_PREFILL:-120}" "$OUT/bench.log" \
  "$PYTHON" benchmarks/bench_prefill.py --seqlens 1024,4096,16384 --iters 5 --out "$bench"
stage bench "${BUDGET_BENCH_KV:-60}" "$OUT/bench.log" \
  "$PYTHON" benchmarks/bench_kv_ops.py --out "$bench"
stage bench "${BUDGET_BENCH_BACKWARD:-120}" "$OUT/bench.log" \
  "$PYTHON" benchmarks/bench_backward_cuda.py --seqlens 1024,4096,16384 --iters 5 --out "$bench"
echo "== summary"
cat "$summary"
