# regdpo: `make test` and `make demo` bootstrap .venv themselves on a fresh clone.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
TORCH  ?= 2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu

.PHONY: install test test-loaded demo serve clean

$(STAMP): pyproject.toml requirements/constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@# Machines without CUDA get torch's CPU build first (PyTorch's CPU wheel index, then the
	@# default index if that one cannot be reached), so nothing pulls a multi-GB CUDA build.
	@# With nvidia-smi present, the torch you installed (your CUDA build) stays.
	@if command -v nvidia-smi >/dev/null 2>&1; then \
	  echo "CUDA found: keeping your CUDA torch (install it first, see README)"; \
	elif $(PY) -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$(TORCH)')" 2>/dev/null; then \
	  echo "torch $(TORCH) already installed"; \
	else \
	  $(PY) -m pip install -q --retries 1 --timeout 20 --index-url $(TORCH_CPU_INDEX) torch==$(TORCH) \
	  || { echo "PyTorch's CPU index not reachable: trying the default index"; $(PY) -m pip install -q torch==$(TORCH); }; \
	fi
	$(PY) -m pip install -q -c requirements/constraints.txt -e ".[dev]"
	@touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	PREFECT_SERVER_ANALYTICS_ENABLED=false $(PY) -m pytest -q tests

# The suite with a CPU hog on every core (bounded by REGDPO_LOADED_TIMEOUT_S, default 90 min;
# the hogs stop with it, on Ctrl-C too): tests/loaded.py.
test-loaded: $(STAMP)
	PREFECT_SERVER_ANALYTICS_ENABLED=false $(PY) tests/loaded.py -- -q tests

demo: $(STAMP)
	PREFECT_SERVER_ANALYTICS_ENABLED=false $(VENV)/bin/regdpo run configs/demo.yaml

# One machine: Prefect server + UI on http://127.0.0.1:4200, work pools, a worker per pool (Ctrl-C stops all).
# Then, in another shell: export PREFECT_API_URL=http://127.0.0.1:4200/api && .venv/bin/regdpo deploy
serve: $(STAMP)
	PREFECT_SERVER_ANALYTICS_ENABLED=false $(VENV)/bin/regdpo serve

clean:
	rm -rf runs .pytest_cache
