# The two commands of the quick start: `make demo` and `make test`. Each creates or updates the
# project virtual environment first. torch is installed pinned, before anything else, so that
# no dependency resolution can pull a multi-GB CUDA build.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: venv demo test lint format bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[lightning,examples,dev]" "$(TORCH)"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) examples/layer_balance.py

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest -q

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: $(STAMP)
	$(PY) benchmarks/optim_step.py
	$(PY) benchmarks/callback_overhead.py
	$(PY) benchmarks/clarke.py

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
