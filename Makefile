# The two commands of the quick start: `make demo` and `make test`. Each creates or updates the
# project virtual environment first. torch is installed pinned, before anything else, so that
# no dependency resolution can pull a multi-GB CUDA build.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed
EXTRAS := lightning,tensorboard,examples,dev,docs
# Sphinx: warnings are errors (a broken docstring fails the build), all reported at once; -E
# re-reads every page (autodoc output depends on docstrings Sphinx does not track)
SPHINXOPTS ?= -W --keep-going -q -E
# `make dist-check` builds here and installs the wheel into a fresh venv here
DISTDIR  := dist
DISTVENV := build/wheel-venv

.PHONY: venv demo test test-fast lint docs dist-check format bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[$(EXTRAS)]" "$(TORCH)"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) examples/layer_balance.py

# What CI runs (.ci/run): lint, the docs site with warnings as errors, the sdist/wheel check,
# then the whole suite (doctests and slow tests included). pytest runs last so that its summary
# line closes the output.
test: $(STAMP)
	$(MAKE) --no-print-directory lint
	$(MAKE) --no-print-directory docs
	$(MAKE) --no-print-directory dist-check
	$(PY) -m pytest -q

# The inner loop: everything except tests marked slow (DDP, torch.compile, example and benchmark
# subprocesses, fits that render figures); no lint, docs or wheel. Two pytest-xdist workers, each on one
# torch thread (tests/conftest.py); make test stays serial (its DDP tests open ports).
test-fast: $(STAMP)
	$(PY) -m pytest -q -n 2 -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

# The guide and the API reference (Sphinx) from docs/*.rst and the docstrings, into site/
# (git-ignored); MathJax is bundled into the site, so it reads offline (open site/index.html).
docs: $(STAMP)
	$(PY) -m sphinx -b html $(SPHINXOPTS) docs site

# sdist and wheel (the wheel built from the sdist), their metadata checked by twine, then the wheel
# installed into a fresh venv (torch pinned first) and imported from there, outside the source tree.
dist-check: $(STAMP)
	rm -rf $(DISTDIR) $(DISTVENV)
	$(PY) -m build -q --outdir $(DISTDIR) .
	$(VENV)/bin/twine check --strict $(DISTDIR)/*
	$(PY) -m venv $(DISTVENV)
	$(DISTVENV)/bin/python -m pip install --quiet "$(TORCH)"
	$(DISTVENV)/bin/python -m pip install --quiet "$$(ls $(DISTDIR)/*.whl)[lightning]" "$(TORCH)"
	$(DISTVENV)/bin/python -I .ci/check_installed.py $(DISTDIR)

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: $(STAMP)
	$(PY) benchmarks/optim_step.py
	$(PY) benchmarks/callback_overhead.py
	$(PY) benchmarks/figures.py
	$(PY) benchmarks/symmetry_discovery.py
	$(PY) benchmarks/clarke.py

clean:
	rm -rf $(VENV) runs site build dist .pytest_cache .ruff_cache
