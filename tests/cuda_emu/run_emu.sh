#!/usr/bin/env bash
# The CUDA emulation tier (`make cuda-emu`, part of `make test`): builds the unmodified kernel headers
# with g++ against emu_device.h, runs every case under 3 schedules x 2 cp.async modes, then plants
# faults (dropped barriers, swapped mma fragments, a too-weak wait_group) and requires each to be
# caught. Needs only CUDA's headers (cuda_fp16.h etc.), no GPU; skipped loudly without them outside CI.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=build/cuda_emu
JOBS=${MAX_JOBS:-2}
CUDA_INC=""
for d in "${CUDA_HOME:-}" /usr/local/cuda "$(dirname "$(dirname "$(command -v nvcc 2>/dev/null || echo /x/x)")")"; do
  if [ -n "$d" ] && [ -f "$d/include/cuda_fp16.h" ]; then CUDA_INC=$d/include; break; fi
done
if [ -z "$CUDA_INC" ]; then
  echo "SKIPPED cuda-emu: no CUDA headers (cuda_fp16.h) found; set CUDA_HOME"
  [ "${CI:-}" != true ] || exit 1
  exit 0
fi
mkdir -p "$OUT"
start=$SECONDS
# -O1: the kernels' unrolled loops make -O2 builds slow, and the runs are short either way.
# -fstrict-aliasing (off by default at -O1): the kernels must not read one type through another.
FLAGS=(-std=c++17 -O1 -fstrict-aliasing -DKV_PAGED_EMULATE -Itests/cuda_emu -Icsrc/include
       -I"$CUDA_INC")
srcs=(tests/cuda_emu/*.cpp)
# Rebuild an object only when its source, a header it may include, or this script is newer.
stale() {
  local obj=$1 src=$2
  [ ! -f "$obj" ] || [ -n "$(find "$src" tests/cuda_emu csrc/include "$0" -newer "$obj" -print -quit)" ]
}
pids=()
for s in "${srcs[@]}"; do
  o=$OUT/$(basename "$s" .cpp).o
  if stale "$o" "$s"; then
    while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do sleep 0.2; done
    g++ "${FLAGS[@]}" -c "$s" -o "$o" & pids+=($!)
  fi
done
for p in "${pids[@]}"; do wait "$p"; done
g++ -o "$OUT/kernels_emu" "$OUT"/*.o
echo "cuda-emu: built in $((SECONDS - start)) s"
BIN=$OUT/kernels_emu
fail=0
for sched in round-robin reverse warp-alone; do
  for mode in "" --deferred; do
    "$BIN" --schedule "$sched" $mode | tail -n 25 || fail=1
  done
done
# Planted faults: each must make some case fail (exit 1); exit 3 = the fault never fired.
# barrier:<file>#<k> drops the k-th distinct __syncthreads of the file in order of first execution.
# Other names are a kernel's KV_PAGED_PLANTED_FAULT(name) switches.
faults=(
  "--suites decode --schedule warp-alone --fault barrier:decode_attention_kernel.cuh#1"  # setup -> tiles
  "--suites decode --schedule warp-alone --fault barrier:decode_attention_kernel.cuh#2"  # tiles -> merge buffer overlay
  "--suites decode --schedule reverse --fault barrier:decode_attention_kernel.cuh#3"     # warps' partials -> merge
  "--suites decode --schedule warp-alone --fault barrier:decode_attention_kernel.cuh#4"  # merge -> next pass (d256)
  "--suites decode --schedule reverse --fault barrier:decode_attention_kernel.cuh#5"     # merge_splits weights
  "--suites decode --schedule warp-alone --fault barrier:decode_attention_mma_kernel.cuh#1" # Q copies -> warps
  "--suites decode --schedule warp-alone --fault barrier:decode_attention_mma_kernel.cuh#2" # warps' partials -> merge
  "--suites decode --schedule warp-alone --fault barrier:decode_attention_mma_kernel.cuh#3" # merge -> next pass
  "--suites decode --fault mma-a-swap"
  "--suites decode --fault ldmatrix-no-trans"
  "--suites prefill --schedule reverse --fault barrier:prefill_attention_kernel.cuh#1"   # copies -> mma
  "--suites prefill --schedule warp-alone --fault barrier:prefill_attention_kernel.cuh#2" # reads -> overwrite
  "--suites prefill --deferred --schedule warp-alone --fault barrier:prefill_attention_kernel.cuh#3" # Q copies -> O staging
  "--suites prefill --schedule warp-alone --fault barrier:prefill_attention_kernel.cuh#4" # O staged -> 16-B stores
  "--suites prefill --fault prefill-all-interior"   # every K/V tile taken as interior: no masks
  "--suites prefill --fault prefill-forward-order"  # causal tiles in forward (shortest-first) order
  "--suites prefill --fault mma-a-swap"
  "--suites prefill --fault ldmatrix-no-trans"
  "--suites decode,prefill --deferred --fault weak-wait"
  "--suites cascade --schedule warp-alone --fault barrier:cascade_attention_kernel.cuh#1"  # tile -> next tile
  "--suites cascade --schedule warp-alone --fault barrier:cascade_attention_kernel.cuh#2"  # K/V tile -> scores
  "--suites backward --schedule warp-alone --fault barrier:flash_attention_backward_kernel.cuh#1" # step -> next step
  "--suites backward --schedule reverse --fault barrier:flash_attention_backward_kernel.cuh#2"    # lane 0's row_* -> lanes
  "--suites backward --schedule warp-alone --fault barrier:flash_attention_backward_kernel.cuh#3" # P, dS -> dK, dV, dQ
)
for f in "${faults[@]}"; do
  rc=0
  "$BIN" $f >"$OUT/fault.log" 2>&1 || rc=$?
  if [ "$rc" -eq 1 ]; then
    echo "ok   planted fault caught: $(tail -n 1 "$OUT/fault.log")"
  else
    cat "$OUT/fault.log"; echo "FAIL planted fault NOT caught (exit $rc): $f"; fail=1
  fi
done
echo "cuda-emu: $((SECONDS - start)) s in all"
if [ "$fail" -ne 0 ]; then echo "cuda-emu: FAILED"; exit 1; fi
echo "cuda-emu: every kernel case matched its reference under emulation; every planted fault was caught"
