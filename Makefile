# Two entry points for a fresh machine (see README):
#   make demo   installs fastnorm into .venv and runs the demo
#   make test   installs fastnorm with its test, parity, bench and capi extras into .venv and
#               runs ruff and the whole test suite
#   make docs   installs the docs extra and builds the documentation site into docs/_build/html
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test coverage capi bench bench-check bench-half bench-ci docs wheel-check clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e '.[tbb]'
	touch $@

# Everything the whole suite runs: torch parity, the C ABI, the benchmark harness and oneDNN.
# Its extras include those of capi and bench, so their stamps are brought up to date too.
$(VENV)/.installed-test: pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e '.[test,parity,bench,capi]'
	touch $@ $(VENV)/.installed-capi $(VENV)/.installed-bench

$(VENV)/.installed-capi: pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e '.[capi]'
	touch $@

$(VENV)/.installed-bench: pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e '.[bench]'
	touch $@

$(VENV)/.installed-docs: pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e '.[docs]'
	touch $@

demo: $(VENV)/.installed
	$(PY) -m fastnorm.demo

# A cold run is mostly Numba compiling, on one core per process. First the C ABI's cfuncs
# compile every kernel for every dtype, the dtypes shared among 2 processes; the Python API
# loads the same kernels from the cache. Then two pytest-xdist workers, one test module at a
# time each (tests/conftest.py). `pytest` alone runs serially.
test: $(VENV)/.installed-test
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m fastnorm.capi --warm --jobs 2
	$(PY) -m pytest -n 2

# Line and branch coverage of fastnorm/ by the whole suite, kernels included: with
# NUMBA_DISABLE_JIT=1 they run as Python (tests marked jit or slow are skipped; 5.6 min here).
coverage: $(VENV)/.installed-test
	NUMBA_DISABLE_JIT=1 $(PY) -m coverage run -m pytest -q -m "not slow"
	$(PY) -m coverage report

# The wheel as a new user gets it: `python -m build` makes it, a fresh venv installs it with the
# capi extra (numba, numpy, cffi, tbb from PyPI; no torch), and tests/smoke_wheel.py runs there
# from outside the checkout: one norm against NumPy, the C library built from the sources the
# wheel ships, and a C program linked to it. .ci/run runs it.
WHEEL_CHECK := build/wheel-check
wheel-check: $(VENV)/.installed-test
	rm -rf $(WHEEL_CHECK)
	$(PY) -m build --wheel --outdir $(WHEEL_CHECK)/dist .
	$(PY) -m venv $(WHEEL_CHECK)/venv
	$(WHEEL_CHECK)/venv/bin/python -m pip install --quiet "$$(ls $(WHEEL_CHECK)/dist/fastnorm-*.whl)[capi]"
	cd $(WHEEL_CHECK) && venv/bin/python $(CURDIR)/tests/smoke_wheel.py

# Build capi/build/libfastnorm.so (+ fastnorm.pc) and warm the Numba cache (docs/c-api.md).
capi: $(VENV)/.installed-capi
	$(PY) -m fastnorm.capi build

# Benchmarks (docs/benchmarks.md; the benchmarks/ package, run from this directory): a quick table
# (with the traffic floor and oneDNN), and the ratio-based regression gate.
bench: $(VENV)/.installed-bench
	$(PY) -m benchmarks --quick --floor --onednn

bench-check: $(VENV)/.installed-bench
	$(PY) -m benchmarks --check

# bfloat16 and float16 data against float32, torch and oneDNN (about 1 min once compiled).
bench-half: $(VENV)/.installed-bench
	$(PY) -m benchmarks.half

# The short gate of .ci/run: mid-size cases of every dtype, 1 thread, fastnorm/memcpy only (about 18 s).
bench-ci: $(VENV)/.installed-bench
	$(PY) -m benchmarks --check --thresholds benchmarks/ci-thresholds.toml --no-torch

# The documentation site (docs/conf.py: Sphinx, MyST for the Markdown pages, numpydoc, the
# pydata theme) into docs/_build/html (open index.html). Warnings are errors; -E reads every
# page again, so that a second run reports what the first did (about 5 s here).
docs: $(VENV)/.installed-docs
	$(PY) -m sphinx -W --keep-going -E -q -b html -d docs/_build/doctrees docs docs/_build/html

clean:
	rm -rf $(VENV) build *.egg-info docs/_build
	find . -name __pycache__ -prune -exec rm -rf {} +
