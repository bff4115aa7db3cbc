# The README's two commands. Both create .venv at the repo root and install what they need.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP_RUN := $(VENV)/.installed-run
STAMP_DEV := $(VENV)/.installed-dev
STAMP_DEMO := $(VENV)/.installed-demo

.PHONY: demo test lint typecheck unit clean

$(BIN)/python:
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "$(PYTHON) not found; run 'make PYTHON=python3 ...'"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(STAMP_RUN): $(BIN)/python pyproject.toml constraints.txt
	$(BIN)/python -m pip install -q -c constraints.txt -e .
	touch $@

$(STAMP_DEV): $(BIN)/python pyproject.toml constraints.txt
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev]"
	touch $@ $(STAMP_RUN) $(STAMP_DEMO)

$(STAMP_DEMO): $(BIN)/python pyproject.toml constraints.txt
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[demo]"
	touch $@ $(STAMP_RUN)

demo: $(STAMP_DEMO)
	$(BIN)/python -m batchnorm demo

lint: $(STAMP_DEV)
	$(BIN)/ruff check src tests tools
	$(BIN)/ruff format --check src tests tools

typecheck: $(STAMP_DEV)
	$(BIN)/mypy

# The kernels' tests run a second time on one thread: results must not depend on the thread
# count (the main run uses two, whatever the machine has). The test compiling for a CPU without
# F16C runs once: it compiles a cold cache of its own, whatever the thread count.
KERNEL_TESTS := tests/test_cpu_kernels.py tests/test_cpu_numerics.py tests/test_numerics_search.py \
	tests/test_direct_calls.py tests/test_masks.py tests/test_numpy_reference.py \
	tests/test_narrow_rows.py tests/test_renorm_step.py tests/test_half_kernels.py

# Two pytest workers (pytest-xdist), each test file in one of them (its module fixtures, such as
# the gloo runs, once): on a cold Numba cache most of the suite's time is compiling, one core per
# process, so two workers took pytest on the 2-core development machine from 12.1 to 8.0 minutes.
TEST_WORKERS ?= 2

unit: $(STAMP_DEV)
	OMP_NUM_THREADS=2 NUMBA_NUM_THREADS=2 $(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile
	OMP_NUM_THREADS=1 NUMBA_NUM_THREADS=1 $(BIN)/python -m pytest -q $(KERNEL_TESTS) \
		-k "not without_f16c"

test: lint typecheck unit

clean:
	rm -rf $(VENV)
