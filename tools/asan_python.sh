#!/usr/bin/env bash
# The Python BlockManager tests (threads hammering one manager, every bad argument, the contract)
# against a build of the pybind11 binding + the C++ core with AddressSanitizer and UBSan: the
# binding (csrc/python/) and the core (csrc/block_manager.cpp, csrc/prefix_cache.cpp) compiled into
# the module _bm_sanitized (tests/asan/bm_module.cpp); tests/conftest.py swaps it in for
# kv_paged.BlockManager. Python and torch are not instrumented: libasan is preloaded, leaks are not
# checked (CPython's own allocations would drown them), any ASan or UBSan report fails the run.
# Deselected here (run by the plain pytest): the test that bounds RSS growth, which ASan's
# quarantine of freed memory (up to 256 MB) defeats by design.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
OUT=build/asan-python
mkdir -p "$OUT"
TORCH_INC=$("$PYTHON" -c 'from torch.utils.cpp_extension import include_paths; print(" ".join("-I" + p for p in include_paths()))')
PY_INC=$("$PYTHON" -c 'import sysconfig; print("-I" + sysconfig.get_paths()["include"])')
SUFFIX=$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
TORCH_LIB=$("$PYTHON" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')
ABI=$("$PYTHON" -c 'import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))')
SAN="-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer"
SOURCES="tests/asan/bm_module.cpp csrc/python/block_manager_binding.cpp csrc/python/int_args.cpp
  csrc/block_manager.cpp csrc/prefix_cache.cpp"
MODULE="$OUT/_bm_sanitized$SUFFIX"
STAMP="$OUT/.sources"
KEY=$(cat $SOURCES csrc/include/kv_paged/*.h csrc/block_manager_internal.h csrc/python/*.h | sha256sum | cut -c1-16)
if [ ! -f "$MODULE" ] || [ "$(cat "$STAMP" 2>/dev/null)" != "$KEY" ]; then
  echo "asan-python: building $MODULE"
  OBJS=""
  for src in $SOURCES; do
    obj="$OUT/$(basename "${src%.cpp}").o"
    g++ -std=c++20 -O1 -g -fPIC $SAN -D_GLIBCXX_USE_CXX11_ABI="$ABI" -DTORCH_EXTENSION_NAME=_bm_sanitized -DKV_PAGED_MODULE_LOCAL_TYPES \
      -Icsrc -Icsrc/include $TORCH_INC $PY_INC -c "$src" -o "$obj" &
    OBJS="$OBJS $obj"
    if [ "${MAX_JOBS:-2}" -le 1 ]; then wait; fi
  done
  wait
  g++ -shared $SAN $OBJS -L"$TORCH_LIB" -ltorch_python -ltorch -ltorch_cpu -lc10 \
    -Wl,-rpath,"$TORCH_LIB" -o "$MODULE"
  echo "$KEY" > "$STAMP"
fi
[[ "$(nm -D "$MODULE")" == *__asan_init* ]] || { echo "asan-python: $MODULE is not instrumented"; exit 1; }
export KV_PAGED_SANITIZED_BM="$PWD/$MODULE"
export ASAN_OPTIONS=detect_leaks=0:halt_on_error=1:abort_on_error=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
export LD_PRELOAD="$(g++ -print-file-name=libasan.so):$(g++ -print-file-name=libubsan.so)"
# The tests must see the sanitized class (tests/conftest.py swaps it in), not kv_paged._C's.
"$PYTHON" -c 'import sys; sys.path.insert(0, "tests"); import conftest, kv_paged
assert kv_paged.BlockManager.__module__ == "_bm_sanitized", kv_paged.BlockManager.__module__'
"$PYTHON" -m pytest -q -p no:cacheprovider tests/test_block_manager_threads.py \
  tests/test_block_manager_args.py tests/test_block_manager.py tests/test_block_manager_cow.py \
  -k "not extra_keys_are_forgotten_when_no_block_uses_them" "$@"
echo "asan-python: clean"
