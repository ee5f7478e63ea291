# regdpo: `make test` and `make demo` bootstrap .venv themselves on a fresh clone.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install test demo clean

$(STAMP): pyproject.toml requirements/constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@# CPU machines get the CPU build of torch first, so nothing pulls a multi-GB CUDA wheel.
	@if command -v nvidia-smi >/dev/null 2>&1; then \
	  echo "CUDA found: keeping/choosing your CUDA torch (install it first, see README)"; \
	else \
	  $(PY) -m pip install -q torch==2.13.0; \
	fi
	$(PY) -m pip install -q -c requirements/constraints.txt -e ".[dev]"
	@touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	PREFECT_SERVER_ANALYTICS_ENABLED=false $(PY) -m pytest -q tests

demo: $(STAMP)
	PREFECT_SERVER_ANALYTICS_ENABLED=false $(VENV)/bin/regdpo run configs/demo.yaml

clean:
	rm -rf runs .pytest_cache
