# Two entry points for a fresh machine: `make demo` (the main job) and `make test` (the suite).
# Both create .venv and install what they need. torch==2.13.0 is installed first on its own:
# on these machines it is the CPU build on local disk, where a bare `torch` would download CUDA.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup demo test lint bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

demo: setup
	$(BIN)/hybridlm info debug-small --context 8192
	$(BIN)/hybridlm generate debug-small --prompt "Hybrid models keep state, not a cache: " --max-new-tokens 24
	rm -f out/demo.duckdb
	$(BIN)/hybridlm profile debug-small --db out/demo.duckdb
	$(BIN)/hybridlm report out/demo.duckdb --plot out/demo.png --perfetto out/demo.perfetto.json > /dev/null
	@echo "wrote out/demo.duckdb, out/demo.png and out/demo.perfetto.json (open it in ui.perfetto.dev)"

test: setup lint
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: setup
	OMP_WAIT_POLICY=PASSIVE $(BIN)/python -m benchmarks.bench_ops
	OMP_WAIT_POLICY=PASSIVE $(BIN)/python -m benchmarks.bench_trace_overhead
	OMP_WAIT_POLICY=PASSIVE $(BIN)/python -m benchmarks.bench_load_memory
	OMP_WAIT_POLICY=PASSIVE $(BIN)/python -m benchmarks.bench_decode
	OMP_WAIT_POLICY=PASSIVE $(BIN)/python -m benchmarks.bench_compile
	OMP_WAIT_POLICY=PASSIVE $(BIN)/python -m benchmarks.bench_scaling

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache out
