# kv_paged developer entry points. `make demo` and `make test` do all set-up on a fresh machine:
# a .venv with the pinned CPU torch when no torch is importable, the Python test dependencies,
# libgtest-dev via apt-get, the extension build. PYTHON=/path/to/python uses that interpreter as is.
SHELL := /bin/bash
VENV := .venv
TORCH_PIN := torch==2.13.0
export MAX_JOBS ?= 2

# PYTHON: the one given, else .venv if it exists, else python3 if it imports torch, else a new .venv.
ifeq ($(origin PYTHON),undefined)
  ifneq ($(wildcard $(VENV)/bin/python),)
    PYTHON := $(VENV)/bin/python
  else ifeq ($(shell python3 -c 'import torch' >/dev/null 2>&1 && echo yes),yes)
    PYTHON := python3
  else
    PYTHON := $(VENV)/bin/python
  endif
endif
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

# The oldest transformers kv_paged supports (pyproject's lower bound; the GPU machine's version) and
# the tests that touch transformers, run again against it by `make test-oldest`. psutil: its
# continuous batching sizes its cache with it on CPU.
OLDEST_TRANSFORMERS := transformers==5.17.0
OLDEST_EXTRAS := psutil
OLDEST_VENV := .venv-oldest
OLDEST_TESTS := tests/test_hf_cache.py tests/test_hf_models.py tests/test_hf_beam.py tests/test_engine_beam.py \
  tests/test_hf_wrapper.py tests/test_interrupts.py tests/test_engine.py tests/test_beam_search.py \
  tests/test_tensor_parallel.py

.PHONY: demo test build python-env gtest cpp-test asan-python cuda-check cuda-emu lint pytest test-oldest bench clean

demo: build
	$(PYTHON) -m kv_paged demo

test: build cpp-test asan-python cuda-check cuda-emu lint pytest test-oldest

# Python environment: torch (pinned, only when none is importable) and the test/demo dependencies.
# Each is installed only when missing, so this works offline where everything is already there.
python-env:
	@if [ "$(PYTHON)" = "$(VENV)/bin/python" ] && [ ! -x $(VENV)/bin/python ]; then \
	  echo "creating $(VENV)"; python3 -m venv $(VENV); fi
	@$(PYTHON) -c 'import torch' 2>/dev/null || $(PYTHON) -m pip install -q $(TORCH_PIN)
	@$(PYTHON) tools/ensure_deps.py

# The extension, rebuilt unless the last build's stamp names the installed torch and the content
# hashes of csrc/ and setup.py (content, not mtimes: a file restored with an old mtime still
# rebuilds; a no-op setup.py run costs ~10 s of imports, and `make demo` runs this first).
EXT_STAMP := build/.ext-built
BUILD_KEY = $(shell $(PYTHON) -c 'import importlib.metadata as m, hashlib, runpy; \
  h = runpy.run_path("kv_paged/_source_hash.py")["source_hash"]("."); \
  print(m.version("torch"), h, hashlib.sha256(open("setup.py", "rb").read()).hexdigest()[:16])')
build: python-env
	@key="$(BUILD_KEY)"; \
	if [ -f $(EXT_STAMP) ] && ls kv_paged/_C*.so >/dev/null 2>&1 && [ "$$(cat $(EXT_STAMP))" = "$$key" ]; then \
	  echo "build: kv_paged._C is up to date"; \
	else $(PYTHON) setup.py -q build_ext --inplace && mkdir -p build && echo "$$key" > $(EXT_STAMP); fi

gtest:
	@if [ ! -f /usr/include/gtest/gtest.h ]; then \
	  echo "installing libgtest-dev"; \
	  ($(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq libgtest-dev) || \
	  { echo "could not install libgtest-dev"; [ "$${CI:-}" != true ] || exit 1; }; fi

# C++ tests of the torch-free core: a release build, then the same tests under ASan + UBSan.
# Skipped (loudly) only outside CI when GoogleTest cannot be installed (the offline GPU machine).
cpp-test: gtest
	@if [ ! -f /usr/include/gtest/gtest.h ]; then echo "SKIPPED C++ tests: no GoogleTest"; exit 0; fi; \
	set -e; \
	cmake -S . -B build/cpp -DCMAKE_BUILD_TYPE=Release >/dev/null; \
	cmake --build build/cpp -j $(MAX_JOBS); \
	ctest --test-dir build/cpp --output-on-failure; \
	cmake -S . -B build/cpp-sanitize -DCMAKE_BUILD_TYPE=Debug -DKV_PAGED_SANITIZE=ON >/dev/null; \
	cmake --build build/cpp-sanitize -j $(MAX_JOBS); \
	ctest --test-dir build/cpp-sanitize --output-on-failure

# The Python BlockManager tests (threads, bad arguments, contract) against an ASan + UBSan build of
# the pybind11 binding and the C++ core (tools/asan_python.sh; ~2 min to build on 2 cores).
asan-python: build
	@PYTHON=$(PYTHON) bash tools/asan_python.sh

# Compiles every CUDA kernel (and the CUDA glue) for sm_90a and sm_80 wherever nvcc exists.
cuda-check:
	@if command -v nvcc >/dev/null 2>&1; then PYTHON=$(PYTHON) bash tools/cuda_check.sh; \
	else echo "cuda-check: nvcc not found, skipped"; fi

# The CUDA kernels run on the CPU: the unmodified kernel headers built by g++ over an emulator of
# threads, barriers, warp collectives, ldmatrix / mma.sync and cp.async (tests/cuda_emu/), checked
# against a long double reference under adversarial schedules, plus planted faults it must catch.
# Needs CUDA's headers only; skipped (loudly) without them outside CI.
cuda-emu:
	@bash tests/cuda_emu/run_emu.sh

# ruff lint + format check (config in pyproject.toml); skipped where ruff is missing (offline GPU machine).
lint: python-env
	@if $(PYTHON) -m ruff --version >/dev/null 2>&1; then \
	  $(PYTHON) -m ruff check . && $(PYTHON) -m ruff format --check kv_paged tests benchmarks tools; \
	else echo "lint: ruff not installed, skipped"; [ "$${CI:-}" != true ] || exit 1; fi

pytest: build
	$(PYTHON) -m pytest -q tests

# The transformers-facing tests again on the oldest supported transformers, in $(OLDEST_VENV) (over
# this environment's torch and packages, see tools/oldest_env.py). Skipped (loudly) only outside CI
# when it cannot be installed (the offline GPU machine).
test-oldest: build
	@if $(PYTHON) tools/oldest_env.py $(OLDEST_VENV) $(OLDEST_TRANSFORMERS) $(OLDEST_EXTRAS); then \
	  echo "pytest on $(OLDEST_TRANSFORMERS)"; \
	  $(OLDEST_VENV)/bin/python -m pytest -q $(OLDEST_TESTS); \
	else echo "SKIPPED test-oldest: $(OLDEST_TRANSFORMERS) could not be installed"; \
	  [ "$${CI:-}" != true ] || exit 1; fi

bench: build
	$(PYTHON) benchmarks/bench_block_manager.py
	$(PYTHON) benchmarks/bench_attention.py

clean:
	rm -rf build kv_paged/_C*.so *.egg-info
