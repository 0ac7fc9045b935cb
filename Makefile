# qconv developer entry points. `make demo` and `make test` work on a fresh machine that can
# reach the package registries (PyPI). torch is pinned to the CPU build this project uses.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
CACHE ?= .cache
SHARED ?= ../shared

.PHONY: demo test venv venv-test clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml $(VENV)/.installed
	$(PY) -m pip install -q -e '.[test]'
	touch $@

venv: $(VENV)/.installed
venv-test: $(VENV)/.installed-test

test: venv-test
	$(PY) -m pytest -q

demo: venv
	$(PY) bench/example_model.py --cache $(CACHE) --demo --eval-text $(SHARED)/data/wikitext-2-raw-test.txt \
		--calib $(SHARED)/data/c4-sample.jsonl

clean:
	rm -rf $(VENV) $(CACHE) .pytest_cache
