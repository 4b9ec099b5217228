#!/usr/bin/env bash
# compute-sanitizer memcheck + racecheck of the CUDA kernels on a small grid (for the GPU machine:
# needs a CUDA build of kv_paged and compute-sanitizer on PATH). Runs the CUDA kernel tests that use
# small shapes (the long-context ones would take hours under the sanitizer).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
command -v compute-sanitizer >/dev/null || { echo "memcheck: compute-sanitizer not found"; exit 1; }
SMALL='not 32k and not 16k and not long and not large_pool and not graph and not debug'
for tool in memcheck racecheck; do
  echo "== compute-sanitizer --tool $tool"
  compute-sanitizer --tool "$tool" --error-exitcode 1 --target-processes all \
    "$PYTHON" -m pytest -q -x tests/test_cuda_kernels.py -k "$SMALL"
done
echo "memcheck: clean"
