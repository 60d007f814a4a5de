# `make demo` and `make test` set up everything they need in .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
VLLM_STAMP := $(VENV)/.vllm-installed
# CPU-only machines get the CPU build of torch, installed before the project so that the
# project's `torch>=2.4` is already met and no CUDA packages are pulled. Point pip at
# PyTorch's CPU wheel index (TORCH_PIP_ARGS="--index-url ...") where the plain registry
# only has CUDA builds.
TORCH_CPU ?= torch==2.13.0
TORCH_PIP_ARGS ?=

.PHONY: demo test lint clean-venv demo-models browser

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

# The tests run the vLLM engine for real: vLLM's CPU build on a machine without a GPU (no
# CUDA package comes with it), vLLM itself on one with a GPU.
$(VLLM_STAMP): $(STAMP) mergesearch/install_vllm.py
	$(BIN)/python -m mergesearch.install_vllm --quiet
	touch $@

test: $(STAMP) $(VLLM_STAMP) browser
	$(BIN)/python -m pytest -q

# The dashboard's browser test drives Debian's chromium through chromedriver. They are
# installed here when missing and the machine allows it (root with apt-get); otherwise that
# test is skipped and says why.
browser:
	@if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing Debian's chromium and chromium-driver for the browser test"; \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get install -y -q --no-install-recommends chromium chromium-driver >/dev/null 2>&1 \
		|| { apt-get update -q >/dev/null 2>&1 && \
		     apt-get install -y -q --no-install-recommends chromium chromium-driver >/dev/null; } \
		|| echo "could not install chromium: the browser test will be skipped"; \
	else \
		echo "no chromium and no root apt-get to install it: the browser test will be skipped"; \
	fi

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/hadolint Dockerfile

# Rebuild the demo's tokenizer, models and probe sets (a few minutes on two CPU cores).
demo-models: $(STAMP)
	$(BIN)/python -m search.demo.build --out search/demo/assets

clean-venv:
	rm -rf $(VENV)
