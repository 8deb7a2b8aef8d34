#!/usr/bin/env bash
# One rollout server, run as one task of the rollout srun step (common.sh starts it).
#
# Task i on a node (SLURM_LOCALID) listens on ROLLOUT_BASE_PORT + i and, on GPUs,
# uses accelerators HPT_ROLLOUT_GPU_OFFSET + i * ROLLOUT_TP ... + ROLLOUT_TP - 1.
#   ROLLOUT_SERVER=sglang  python -m sglang.launch_server (GPU nodes)
#   ROLLOUT_SERVER=own     python -m megatron_hpt.rollout.server (the project's own
#                          SGLang-protocol server; the CPU profile uses it)
# ROLLOUT_SERVER_ARGS adds arguments to either (e.g. "--mem-fraction-static 0.8").
# HPT_DRY_RUN=1 prints the command and exits.
set -euo pipefail

local_id=${SLURM_LOCALID:-0}
port=$((ROLLOUT_BASE_PORT + local_id))
first_gpu=$((${HPT_ROLLOUT_GPU_OFFSET:-0} + local_id * ROLLOUT_TP))
read -r -a extra <<<"${ROLLOUT_SERVER_ARGS:-}"

case "$ROLLOUT_SERVER" in
  sglang)
    cmd=("${SGLANG_PYTHON:-$HPT_PYTHON}" -m sglang.launch_server --model-path "$ROLLOUT_MODEL"
      --tp-size "$ROLLOUT_TP" --base-gpu-id "$first_gpu" --host 0.0.0.0 --port "$port" "${extra[@]}")
    ;;
  own)
    if [[ ${ROLLOUT_DEVICE:-cpu} == cpu ]]; then device=cpu; else device="cuda:$first_gpu"; fi
    cmd=("$HPT_PYTHON" -m megatron_hpt.rollout.server --model-path "$ROLLOUT_MODEL"
      --host 0.0.0.0 --port "$port" --device "$device" "${extra[@]}")
    ;;
  *)
    echo "rollout_server.sh: ROLLOUT_SERVER must be sglang or own, got '$ROLLOUT_SERVER'" >&2
    exit 2
    ;;
esac
printf '[rollout %s:%s]' "${SLURMD_NODENAME:-$(hostname)}" "$port"
printf ' %q' "${cmd[@]}"
printf '\n'
[[ ${HPT_DRY_RUN:-0} == 1 ]] && exit 0
exec "${cmd[@]}"
