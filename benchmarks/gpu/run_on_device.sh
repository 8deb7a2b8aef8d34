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
#      parts again. Results land in $OUT (they come back with the call) as
#      <date>-<device>-gpu.md/.json; copy them into benchmarks/results/ and commit them.
#
# Time budget (device time, about 10 of a session's 15 minutes): machine start 1-3 min;
# each part ~5 s; install ~60 s; the validation ~5 min: train (4 alternating phases at the
# Qwen2.5-1.5B shape, ~90 s), step0 (BF16 and consistent FP8, ~30 s), logprobs at 1.5B
# (~20 s) and 7B (~60 s, with an fp32 reference model), sync at 1.5B (~20 s). Parts that
# would start after GPU_VALIDATION_BUDGET_S seconds (default 390) are skipped and recorded,
# so the call ends well inside its 600 s; results are rewritten after every part, so a
# call cut short still returns what it measured.
#
# Shapes: GPU_VALIDATION_SHAPES (default qwen2.5-1.5b,qwen2.5-7b; also smollm2, tiny).
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
    start=$(date +%s)
    bash .gpu/small/install.sh
    export PYTHONPATH=/tmp/site:$PWD
    export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True  # phases build and free whole models
    nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv || true
    out=${OUT:-benchmarks/results}
    spent=$(( $(date +%s) - start ))
    budget=$(( ${GPU_VALIDATION_BUDGET_S:-390} - spent ))
    python3 benchmarks/gpu/gpu_validation.py --shape "${GPU_VALIDATION_SHAPES:-qwen2.5-1.5b,qwen2.5-7b}" \
      --out "$out" --budget-s "$budget"
    ;;
  *)
    sed -n '2,29p' "$here/run_on_device.sh"
    exit 2
    ;;
esac
