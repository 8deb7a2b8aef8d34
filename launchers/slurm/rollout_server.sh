#!/usr/bin/env bash
# One rollout server, run as one task of the rollout srun step (common.sh starts it).
#
# Task i on a node (SLURM_LOCALID) listens on ROLLOUT_BASE_PORT + i and, on GPUs, gets
# the ROLLOUT_TP GPUs HPT_ROLLOUT_GPU_OFFSET + i * ROLLOUT_TP ... + ROLLOUT_TP - 1, counted
# in the GPUs the step sees (CUDA_VISIBLE_DEVICES, else 0..GPUS_PER_NODE-1), as its own
# CUDA_VISIBLE_DEVICES (the placement the Python launcher uses too).
#   ROLLOUT_SERVER=sglang  python -m sglang.launch_server (GPU nodes)
#   ROLLOUT_SERVER=own     python -m megatron_hpt.rollout.server (the project's own
#                          SGLang-protocol server; the CPU profile uses it)
# ROLLOUT_HOST            interface to listen on (127.0.0.1; 0.0.0.0 when the trainer is
#                         on other nodes, which needs a key)
# HPT_ROLLOUT_API_KEY     the key (--api-key), or ROLLOUT_API_KEY_FILE: a file holding it
#                         (waited for: another job component may be writing it)
# HPT_ROLLOUT_LAUNCH_TOKEN identifies this job's servers (--launch-token; SGLang:
#                         --served-model-name), checked before the trainer attaches
# ROLLOUT_MEM_FRACTION    SGLang's --mem-fraction-static
# ROLLOUT_WEIGHT_DIR      the only folder our server loads weights from (--weight-dir; the
#                         run's OUTPUT_DIR/weights_sync, where the trainer writes them)
# ROLLOUT_SERVER_ARGS adds arguments to either. HPT_DRY_RUN=1 prints the command and exits.
set -euo pipefail

local_id=${SLURM_LOCALID:-0}
port=$((ROLLOUT_BASE_PORT + local_id))
host=${ROLLOUT_HOST:-127.0.0.1}
read -r -a extra <<<"${ROLLOUT_SERVER_ARGS:-}"

key=${HPT_ROLLOUT_API_KEY:-}
if [[ -z $key && -n ${ROLLOUT_API_KEY_FILE:-} ]]; then
  deadline=$((SECONDS + ${ROLLOUT_STARTUP_TIMEOUT_S:-600}))
  until [[ -s $ROLLOUT_API_KEY_FILE ]]; do
    ((SECONDS < deadline)) || { echo "rollout_server.sh: no key in $ROLLOUT_API_KEY_FILE" >&2; exit 2; }
    sleep 1
  done
  key=$(head -n 1 "$ROLLOUT_API_KEY_FILE")
fi
if [[ $host != 127.0.0.1 && $host != localhost && -z $key ]]; then
  echo "rollout_server.sh: ROLLOUT_HOST=$host reaches beyond this node: set HPT_ROLLOUT_API_KEY or ROLLOUT_API_KEY_FILE" >&2
  exit 2
fi
identity=(--weight-version launch)
[[ -n $key ]] && identity+=(--api-key "$key")

gpu_args=()
if [[ $ROLLOUT_SERVER == sglang || ${ROLLOUT_DEVICE:-cpu} != cpu ]]; then
  IFS=, read -r -a visible <<<"${CUDA_VISIBLE_DEVICES:-$(seq -s, 0 $((${GPUS_PER_NODE:-8} - 1)))}"
  first=$((${HPT_ROLLOUT_GPU_OFFSET:-0} + local_id * ROLLOUT_TP))
  ((first + ROLLOUT_TP <= ${#visible[@]})) || {
    echo "rollout_server.sh: task $local_id needs GPUs $first..$((first + ROLLOUT_TP - 1)) of ${#visible[@]} (${visible[*]})" >&2
    exit 2
  }
  CUDA_VISIBLE_DEVICES=$(IFS=,; echo "${visible[*]:first:ROLLOUT_TP}")
  export CUDA_VISIBLE_DEVICES
  gpu_args=(--base-gpu-id 0)
  [[ -n ${ROLLOUT_MEM_FRACTION:-} ]] && gpu_args+=(--mem-fraction-static "$ROLLOUT_MEM_FRACTION")
fi

case "$ROLLOUT_SERVER" in
  sglang)
    [[ -n ${HPT_ROLLOUT_LAUNCH_TOKEN:-} ]] && identity+=(--served-model-name "$HPT_ROLLOUT_LAUNCH_TOKEN")
    cmd=("${SGLANG_PYTHON:-$HPT_PYTHON}" -m sglang.launch_server --model-path "$ROLLOUT_MODEL"
      --tp-size "$ROLLOUT_TP" "${gpu_args[@]}" --host "$host" --port "$port" "${identity[@]}" "${extra[@]}")
    ;;
  own)
    [[ -n ${HPT_ROLLOUT_LAUNCH_TOKEN:-} ]] && identity+=(--launch-token "$HPT_ROLLOUT_LAUNCH_TOKEN")
    if [[ ${ROLLOUT_DEVICE:-cpu} == cpu ]]; then device=cpu; else device=cuda; fi
    weight_dir=${ROLLOUT_WEIGHT_DIR:-${OUTPUT_DIR:?rollout_server.sh: set OUTPUT_DIR or ROLLOUT_WEIGHT_DIR}/weights_sync}
    cmd=("$HPT_PYTHON" -m megatron_hpt.rollout.server --model-path "$ROLLOUT_MODEL"
      --host "$host" --port "$port" --device "$device" --weight-dir "$weight_dir" "${identity[@]}" "${extra[@]}")
    ;;
  *)
    echo "rollout_server.sh: ROLLOUT_SERVER must be sglang or own, got '$ROLLOUT_SERVER'" >&2
    exit 2
    ;;
esac
printf '[rollout %s:%s%s]' "${SLURMD_NODENAME:-$(hostname)}" "$port" "${CUDA_VISIBLE_DEVICES:+ gpus $CUDA_VISIBLE_DEVICES}"
for word in "${cmd[@]}"; do
  [[ -n $key && $word == "$key" ]] && word='***'
  printf ' %q' "$word"
done
printf '\n'
[[ ${HPT_DRY_RUN:-0} == 1 ]] && exit 0
exec "${cmd[@]}"
