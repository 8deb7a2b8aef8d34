#!/bin/bash
# The GPU validation (benchmarks/gpu/gpu_validation.py) on the lent GPU machine: one H100 or
# H200 with Python 3.12 and torch 2.11 but no megatron-core, Transformer Engine or network.
# It follows shared/gpu/README.md: TE 2.20.2 and megatron-core 0.19.2 travel in parts of at
# most 64 MiB per transfer (the working tree included) and are installed into /tmp/site.
#
# How to run it (each "device call" is one command on the machine; the ignored .gpu/ paths
# must be sent along explicitly, e.g. as the run tool's `carry`):
#
#   0. here, beforehand (no device time):   bash benchmarks/gpu/run_on_device.sh prepare
#      It fills .gpu/ (git-ignored) and prints how many parts there are: p0 .. pN.
#   1. device calls, back to back (the machine keeps /tmp/parts only while it stays up,
#      about 30 s after a command returns), one per part but the last:
#         command: bash benchmarks/gpu/run_on_device.sh part K      carry: [".gpu/pK"]
#   2. the device call that installs and runs everything (timeout 600 s):
#         command: bash benchmarks/gpu/run_on_device.sh run         carry: [".gpu/pN", ".gpu/small"]
#      If install.sh says a part is missing, the machine went back in between: send the
#      parts again.
#
# What `run` does, in this order, each stage in its own folder of $OUT (its results files,
# <date>-<device>-gpu.md and .json, rewritten after every part, so whatever was measured
# comes back even when the call is cut short), with all output unbuffered in $OUT/run.log:
#   smoke/         tiny shape, seconds: TE layer spec, weight names both ways, FP8 step-0 ratio
#   qwen2.5-1.5b/  step0 (BF16, consistent FP8), logprobs (FP8 vs BF16), train (ours vs plain
#                  HF, tokens/s and MFU), sync (weight sync through disk)
#   qwen2.5-7b/    logprobs (FP8 vs BF16, with an fp32 reference)
# That is 7 files, within the 8 a call brings back. Copy them into benchmarks/results/ and
# commit them.
#
# Time budget (device time, about 10 of a session's 15 minutes): machine start 1-3 min;
# each part call ~5 s; then one call of at most 600 s: install ~60 s, smoke ~30 s, 1.5B ~200 s
# (train ~90 s), 7B ~70 s. A stage or part that would start later than GPU_VALIDATION_BUDGET_S
# (default 480) seconds into the call is skipped and recorded; a stage still running at
# GPU_VALIDATION_HARD_S (default 560) is stopped, keeping the parts it finished. The call's
# timeout_s must be above the hard limit (600).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cd "$here/../.."  # the project root, where a device call also starts

shared_gpu() {
  # shared/gpu beside the main checkout (/work/shared/gpu), or beside this checkout
  for d in "${HPT_SHARED_GPU:-}" /work/shared/gpu ../shared/gpu; do
    [ -n "$d" ] && [ -f "$d/prepare.sh" ] && { echo "$d"; return; }
  done
  echo "shared/gpu/prepare.sh not found: set HPT_SHARED_GPU to its folder" >&2
  exit 2
}

start=$(date +%s)
budget=${GPU_VALIDATION_BUDGET_S:-480}
hard=${GPU_VALIDATION_HARD_S:-560}
python=${GPU_VALIDATION_PYTHON:-python3}

# One stage: gpu_validation.py into $out/<name>, started only inside the budget, stopped at
# the hard limit (its finished parts are already on disk).
stage() {
  local name=$1 now
  shift
  now=$(( $(date +%s) - start ))
  if (( now >= budget || now >= hard )); then
    echo "== $name: not started (time budget: ${now} s of ${budget} s used)"
    return 0
  fi
  echo "== $name (${now} s into the call)"
  timeout --kill-after=10 $(( hard - now )) "$python" benchmarks/gpu/gpu_validation.py \
    --out "$out/$name" --budget-s $(( budget - now )) "$@" || echo "== $name: exit status $?"
}

validate() {
  if [ "${GPU_VALIDATION_SKIP_INSTALL:-0}" != 1 ]; then
    bash .gpu/small/install.sh
    export PYTHONPATH=/tmp/site:$PWD
  fi
  export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True  # parts build and free whole models
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv || true
  stage smoke --shape tiny --parts smoke
  stage qwen2.5-1.5b --shape qwen2.5-1.5b --parts step0,logprobs,train,sync
  stage qwen2.5-7b --shape qwen2.5-7b --parts logprobs
}

case "${1:-}" in
  prepare)
    bash "$(shared_gpu)/prepare.sh"
    n=$(cat .gpu/small/tecore.parts)
    echo "device calls, back to back:"
    for k in $(seq 0 $((n - 2))); do
      echo "  command: bash benchmarks/gpu/run_on_device.sh part $k    carry: [\".gpu/p$k\"]"
    done
    echo "  command: bash benchmarks/gpu/run_on_device.sh run       carry: [\".gpu/p$((n - 1))\", \".gpu/small\"]  (timeout 600)"
    ;;
  part)
    k=${2:?part number}
    mkdir -p /tmp/parts && cp ".gpu/p$k"/* /tmp/parts/
    ls -la /tmp/parts
    ;;
  run)
    out=${OUT:-benchmarks/results/gpu-run}
    mkdir -p "$out"
    export PYTHONUNBUFFERED=1
    validate 2>&1 | tee -a "$out/run.log"
    ;;
  *)
    sed -n '2,36p' "$here/run_on_device.sh"
    exit 2
    ;;
esac
