# Two commands for a fresh machine:
#   make run    set up .venv and run the main job: the quickstart training run
#   make demo   the attention kernel against the reference (and SDPA timings on a GPU)
#   make test   set up .venv and run the test suite
#
# torch: by default pip installs torch==2.13.0 from the configured index. For the CPU-only build
# (no GPU, a few hundred MB instead of several GB), point pip at PyTorch's CPU wheel index:
#   make test TORCH_INDEX=https://download.pytorch.org/whl/cpu
# On a GPU machine whose Python already has a CUDA torch >= 2.11, use it instead of a new venv:
#   make run VENV_FLAGS=--system-site-packages TORCH_SPEC=

PYTHON ?= python3
VENV ?= .venv
VENV_FLAGS ?=
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
PY := $(VENV)/bin/python

.PHONY: setup run demo test clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(if $(TORCH_SPEC),$(PY) -m pip install -q "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)))
	# A CUDA build of torch brings its own matching Triton; keep it. The CPU build brings none: add
	# Triton 3.6 (its interpreter runs the kernels in the tests). That interpreter breaks on numpy >= 2.3.
	$(PY) -c "import triton" 2>/dev/null || $(PY) -m pip install -q "triton==3.6.0"
	$(PY) -m pip install -q "numpy<2.3"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

run: setup
	$(PY) -m trainer $(ARGS)

demo: setup
	$(PY) scripts/attention_demo.py

# One test worker per core (pytest-xdist): on 2 cores the suite takes ~7 minutes instead of ~12.
test: setup
	$(PY) -m pytest -q -n auto tests

clean:
	rm -rf $(VENV)
