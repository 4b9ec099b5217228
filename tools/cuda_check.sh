#!/usr/bin/env bash
# Compile-checks every CUDA source for sm_90a AND sm_80 (run by `make cuda-check`, part of `make test`):
# 1. each torch-free kernel header alone (proves it needs no torch), 2. each csrc/ops/*.cu glue file
# against torch's headers with the flags setup.py + BuildExtension use. Each file is compiled once,
# with both -gencode targets, two files at a time. 3. an sm_75 build must stop at cuda_utils.cuh's
# #error; 4. tests/cuda/test_*.cu (host-callable kernel math) built by nvcc and run here. Any error
# fails the script.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
JOBS=${MAX_JOBS:-2}
OUT=build/cuda_check
mkdir -p "$OUT"

ARCHS=(-gencode=arch=compute_90a,code=sm_90a -gencode=arch=compute_80,code=sm_80)
COMMON=(-O3 --use_fast_math --expt-relaxed-constexpr -lineinfo -DKV_PAGED_WITH_CUDA
        -Icsrc/include -Icsrc "${ARCHS[@]}" -Xcompiler -fPIC)
# The torch-free kernel headers must be plain C++17; the glue gets C++20, the standard torch's
# BuildExtension gives nvcc (torch 2.13's headers need it), as in the real build.
HEADER_STD=-std=c++17
GLUE_STD=-std=c++20
TORCH_INC=$($PYTHON -c 'import torch.utils.cpp_extension as c; print(" ".join(c.include_paths()))')
ABI=$($PYTHON -c 'import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))')
TORCH_FLAGS=(-D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__
             -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__
             -DTORCH_API_INCLUDE_EXTENSION_H -DTORCH_EXTENSION_NAME=_C
             -D_GLIBCXX_USE_CXX11_ABI="$ABI" -diag-suppress=3306)
for d in $TORCH_INC; do TORCH_FLAGS+=(-I"$d"); done
# CPU wheels of torch ship c10/cuda without its generated cmake-macros header.
FIRST_INC=${TORCH_INC%% *}
if [ ! -f "$FIRST_INC/c10/cuda/impl/cuda_cmake_macros.h" ]; then
  TORCH_FLAGS+=(-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE)
fi

jobs_file=$OUT/jobs.txt
: > "$jobs_file"
printf '#include "kv_paged/cuda_utils.cuh"\n' > "$OUT/cuda_utils.header.cu"
for h in csrc/include/kv_paged/*_kernel.cuh; do
  stem=$(basename "$h" .cuh)
  printf '#include "kv_paged/%s.cuh"\n' "$stem" > "$OUT/$stem.header.cu"
  echo "header $OUT/$stem.header.cu" >> "$jobs_file"
done
shopt -s nullglob
for f in csrc/ops/*.cu; do echo "glue $f" >> "$jobs_file"; done

compile() {
  local kind=$1 src=$2 obj log
  obj=$OUT/$(basename "$src" .cu).o
  log=$OUT/$(basename "$src" .cu).log
  local start=$SECONDS
  if [ "$kind" = header ]; then
    nvcc -c "$src" -o "$obj" "$HEADER_STD" "${COMMON[@]}" >"$log" 2>&1 || { cat "$log"; echo "FAIL $src"; return 1; }
  else
    nvcc -c "$src" -o "$obj" "$GLUE_STD" "${COMMON[@]}" "${TORCH_FLAGS[@]}" -Xptxas -warn-spills \
      >"$log" 2>&1 || { cat "$log"; echo "FAIL $src"; return 1; }
  fi
  grep -E "warning|spill" "$log" | grep -v "^$" | sort -u | head -20 || true
  echo "ok   $src (sm_90a + sm_80, $((SECONDS - start)) s)"
}
export -f compile
export OUT
fail=0
# xargs runs `compile` in child shells: arrays do not cross exec, so pass them through a file.
declare -p COMMON TORCH_FLAGS HEADER_STD GLUE_STD > "$OUT/flags.sh"
xargs -P "$JOBS" -L 1 bash -c 'source "$OUT/flags.sh"; compile "$@"' _ < "$jobs_file" || fail=1
# Below sm_80 the build must stop at our #error, naming the need, not deep in ptxas.
old_arch_log=$OUT/sm75.log
if nvcc -c "$OUT/cuda_utils.header.cu" -o "$OUT/sm75.o" "$HEADER_STD" -Icsrc/include \
     -gencode=arch=compute_75,code=sm_75 >"$old_arch_log" 2>&1; then
  echo "FAIL: an sm_75 build of cuda_utils.cuh compiled; it must stop at its #error"; fail=1
elif ! grep -q "need sm_80 or newer" "$old_arch_log"; then
  cat "$old_arch_log"; echo "FAIL: the sm_75 build failed without kv_paged's message"; fail=1
else
  echo "ok   an sm_75 build stops with: need sm_80 or newer"
fi
# The __host__ __device__ math of the kernels, compiled by nvcc and run on this CPU.
for t in tests/cuda/test_*.cu; do
  bin=$OUT/$(basename "$t" .cu)
  if nvcc "$t" -o "$bin" "$HEADER_STD" -Icsrc/include -gencode=arch=compute_80,code=sm_80 \
       >"$bin.log" 2>&1 && "$bin"; then
    echo "ok   $t (host run)"
  else
    cat "$bin.log"; echo "FAIL $t"; fail=1
  fi
done
if [ "$fail" -ne 0 ]; then echo "cuda-check: FAILED"; exit 1; fi
echo "cuda-check: all CUDA sources compile for sm_90a and sm_80"
