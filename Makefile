# One-command set-up and test on a fresh machine (Python, gcc and make are all it needs).
#   make test                      # .venv + CPU torch 2.13.0 + extension + test deps, then pytest
#   make test TORCH_SPEC="torch==2.14.1"
#   make test LOCK=                # resolve the test deps freshly instead of requirements/test.lock
#   make lock                      # re-resolve requirements/test.txt, rewrite requirements/test.lock
#   make stress                    # statistical tests under every CPU configuration (tools/stress_tests.sh)
#   make bench                     # microbenchmarks (tables + JSON under bench/results/)
#   make demo                      # `wagle demo`: embedded benchmark, GradDiff/NPO x 4 masks (saves/demo/)
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
MAX_JOBS ?= 2
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
PYTEST_ARGS ?=
# Exact versions of every test dependency (pip constraints); empty = today's newest versions.
LOCK ?= requirements/test.lock
CONSTRAINTS := $(if $(LOCK),-c $(LOCK))

DEMO_ARGS ?=

.PHONY: test build deps bench clean cuda-check demo lock stress sanitize

$(VENV)/.deps-stamp: pyproject.toml Makefile requirements/test.txt $(LOCK)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel $(CONSTRAINTS)
	$(PIP) install -q "$(TORCH_SPEC)" $(CONSTRAINTS)
	$(PIP) install -q -r requirements/test.txt $(CONSTRAINTS)
	touch $@

deps: $(VENV)/.deps-stamp

build: deps
	MAX_JOBS=$(MAX_JOBS) $(PIP) install -q --no-build-isolation --no-deps -e .

test: build
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: build
	$(PY) bench/bench_score.py
	$(PY) bench/bench_select.py

demo: build
	$(PY) -m wagle_ext.cli demo $(DEMO_ARGS)

lock:
	PYTHON=$(PYTHON) TORCH_SPEC="$(TORCH_SPEC)" bash tools/lock_test_deps.sh

stress: build
	PY=$(PY) bash tools/stress_tests.sh

cuda-check:
	bash tools/check_cuda_compile.sh

# C++ op tests against an ASan+UBSan build of the extension (out of tree, build/sanitize/).
sanitize: deps
	PYTHON=$(PY) MAX_JOBS=$(MAX_JOBS) bash tools/sanitize.sh $(PYTEST_ARGS)

clean:
	rm -rf build *.egg-info wagle_ext/*.so
