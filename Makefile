# The two commands of the README:  `make quickstart`  and  `make test` (both test tiers: `make test-unit`, the fast
# in-process tests, and `make test-integration`, servers, llama.cpp, child processes, the browser, end to end).
# Both install into a local virtual environment (.venv) first; nothing is installed twice.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# A CPU build of torch where that is what the machine has; on a GPU box: make TORCH="torch" (CUDA build)
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.finetune-installed

.PHONY: install quickstart test test-unit test-integration lint bench clean-venv

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml scripts/install_llama_cpp.py
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python scripts/install_llama_cpp.py --python $(BIN)/python
	$(BIN)/python -m pip install -q -e ".[serve,dev]"
	touch $(STAMP)

install: $(STAMP)

quickstart: $(STAMP)
	$(BIN)/finetune run recipes/quickstart.yaml

# Each tier runs its test files $(TEST_JOBS) at a time (pytest-xdist, one file per worker so a module's fixtures run once):
# most integration tests wait on child processes, servers and llama.cpp as much as they compute.
TEST_JOBS ?= 2
PYTEST_JOBS := $(if $(filter 1,$(TEST_JOBS)),,-n $(TEST_JOBS) --dist loadfile)

test: $(STAMP)
	bash scripts/ensure_chromium.sh
	$(BIN)/python -m pytest -q $(PYTEST_JOBS) --durations=10 tests/unit
	$(BIN)/python -m pytest -q $(PYTEST_JOBS) --durations=25 tests/integration

test-unit: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_JOBS) tests/unit

test-integration: $(STAMP)
	bash scripts/ensure_chromium.sh
	$(BIN)/python -m pytest -q $(PYTEST_JOBS) tests/integration

lint: $(STAMP)
	$(BIN)/ruff check finetune serve tests scripts

clean-venv:
	rm -rf $(VENV)
