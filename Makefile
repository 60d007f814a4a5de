# `make demo` and `make test` set up everything they need in .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# CPU-only machines get the CPU build of torch, installed before the project so that the
# project's `torch>=2.4` is already met and no CUDA packages are pulled. Point pip at
# PyTorch's CPU wheel index (TORCH_PIP_ARGS="--index-url ...") where the plain registry
# only has CUDA builds.
TORCH_CPU ?= torch==2.13.0
TORCH_PIP_ARGS ?=

.PHONY: demo test lint clean-venv demo-models

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		echo "GPU found: installing the default (CUDA) torch"; \
		$(BIN)/pip install --quiet --disable-pip-version-check torch; \
	else \
		echo "no GPU: installing CPU $(TORCH_CPU)"; \
		$(BIN)/pip install --quiet --disable-pip-version-check $(TORCH_PIP_ARGS) "$(TORCH_CPU)"; \
	fi
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $@

demo: $(STAMP)
	$(BIN)/mergesearch demo --out runs/demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/hadolint Dockerfile

# Rebuild the demo's tokenizer, models and probe sets (a few minutes on two CPU cores).
demo-models: $(STAMP)
	$(BIN)/python -m search.demo.build --out search/demo/assets

clean-venv:
	rm -rf $(VENV)
