# Everything a new user types. `make test` and `make demo` set up the environments themselves.
PYTHON ?= python3
VENV := .venv
ORACLE := .venv-oracle
ORACLE455 := .venv-oracle-455
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: help venv oracle oracle-455 bench-env test test-all demo bench lint clean

help:
	@echo "make demo   - set up, then run the bundled model in all three backends"
	@echo "make test   - set up, then run the whole default suite (all but 'slow')"
	@echo "make bench  - benchmarks against the peers (writes BENCHMARKS.md)"
	@echo "make lint   - ruff on everything, mypy on opt_core"

BENCHENV := .venv-bench

venv: $(VENV)/.installed
oracle: $(ORACLE)/.installed
oracle-455: $(ORACLE455)/.installed
bench-env: $(BENCHENV)/.installed

$(VENV)/.installed: requirements/main.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -r requirements/main.txt
	$(VENV)/bin/pip install -q --no-deps --no-build-isolation -e .
	touch $@

$(ORACLE)/.installed: requirements/oracle.txt
	test -x $(ORACLE)/bin/python || $(PYTHON) -m venv $(ORACLE)
	$(ORACLE)/bin/pip install -q --upgrade pip
	$(ORACLE)/bin/pip install -q -r requirements/oracle.txt
	touch $@

# The second oracle: transformers 4.55.x, the last release with contrastive search in the library.
$(ORACLE455)/.installed: requirements/oracle-455.txt
	test -x $(ORACLE455)/bin/python || $(PYTHON) -m venv $(ORACLE455)
	$(ORACLE455)/bin/pip install -q --upgrade pip
	$(ORACLE455)/bin/pip install -q -r requirements/oracle-455.txt
	touch $@

# Peers for benchmarks only (transformers 5.x, CTranslate2); never the project's venv.
$(BENCHENV)/.installed: requirements/bench.txt
	test -x $(BENCHENV)/bin/python || $(PYTHON) -m venv $(BENCHENV)
	$(BENCHENV)/bin/pip install -q --upgrade pip
	$(BENCHENV)/bin/pip install -q -r requirements/bench.txt
	touch $@

test: venv oracle oracle-455
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

test-all: venv oracle oracle-455
	$(PY) -m pytest $(PYTEST_ARGS)

demo: venv
	$(VENV)/bin/opt demo

bench: venv oracle bench-env
	$(PY) benchmarks/run_all.py

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy opt_core

clean:
	rm -rf $(VENV) $(ORACLE) $(ORACLE455) $(BENCHENV) .pytest_cache .cache
