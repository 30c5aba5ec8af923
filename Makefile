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

.PHONY: install test test-sanitize demo bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# Build tools and runtime dependencies, re-installed when pyproject.toml changes.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q scikit-build-core cmake ninja
	$(BIN)/pip install -q -r requirements-dev.txt
	touch $@

install: $(STAMP)
	@test -n "$(ORT_INCLUDE_DIR)" || { echo "ONNX Runtime headers missing (see custom_ops/fetch_ort_headers.sh)"; exit 1; }
	$(BIN)/pip install -q --no-build-isolation --no-deps .

test: install
	$(BIN)/pytest -q

# The kernel tests against a build with AddressSanitizer + UndefinedBehaviorSanitizer.
test-sanitize: $(STAMP)
	ICE_ONNX_SANITIZE=ON $(BIN)/pip install -q --no-build-isolation --no-deps \
	  -Cbuild-dir=build/sanitize -Ccmake.build-type=RelWithDebInfo .
	LD_PRELOAD="$$(gcc -print-file-name=libasan.so) $$(gcc -print-file-name=libubsan.so)" \
	  ASAN_OPTIONS=detect_leaks=0 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
	  $(BIN)/python -m pytest -q -p no:cacheprovider tests/test_kernel_exact.py tests/test_kernel_knn.py tests/test_kernel_errors.py
	$(MAKE) install

demo: install
	$(BIN)/ice-onnx demo

bench: install
	$(BIN)/python benchmarks/bench_kernel.py

clean:
	rm -rf build $(VENV)
