# One-command entry points on a fresh machine. Each target creates the virtual environment
# first (CPU PyTorch pinned; override TORCH for a CUDA build, e.g. TORCH=torch).
#   make demo   run the main job: distill the embedded default teacher (the quickstart)
#   make chat   ask the embedded default teacher one question
#   make test   run the test suite
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

$(BIN)/tessera: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev,serve,gpu]"
	touch $@

.PHONY: setup demo chat test lint
setup: $(BIN)/tessera

demo: setup
	$(BIN)/tessera distill --config configs/quickstart.yaml

chat: setup
	$(BIN)/tessera generate smollm2-135m-instruct --chat \
		--prompt "What is the capital of France?"

test: setup
	$(BIN)/python -m pytest -q -m "not gpu" tests

lint: setup
	$(BIN)/ruff check tessera tests benchmarks
