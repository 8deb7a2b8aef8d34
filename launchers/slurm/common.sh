# shellcheck shell=bash
# Helpers shared by the megatron-hpt sbatch scripts (sourced, never run).
#
# What lives here: reading the allocation (node names and the addresses to reach
# them), the profile (gpu | cpu), the container flags for srun, starting rollout
# servers and waiting for them, the trainer command (srun + torchrun), and
# pre-emption: a USR1/TERM to the batch shell is forwarded as TERM to the trainer
# step only, the trainer writes a checkpoint and exits, and the job is requeued;
# the requeued job runs the same command with --resume and continues.

hpt_log() { printf '[megatron-hpt %s] %s\n' "$(date +%H:%M:%S)" "$*"; }
hpt_die() { hpt_log "error: $*" >&2; exit 2; }

# hpt_show_cmd ARGS...: print a command, shell-quoted, as it will run.
hpt_show_cmd() { printf '+'; printf ' %q' "$@"; printf '\n'; }

# hpt_load_profile: source the profile named by HPT_PROFILE (gpu, cpu or a file path).
# A profile only sets defaults: every variable it sets can be given in the
# environment (sbatch --export=ALL,NAME=value) and wins.
hpt_load_profile() {
  local profile=${HPT_PROFILE:-gpu}
  if [[ -f $profile ]]; then
    # shellcheck source=/dev/null
    source "$profile"
  elif [[ -f $HPT_LAUNCH_DIR/profiles/$profile.sh ]]; then
    # shellcheck source=/dev/null
    source "$HPT_LAUNCH_DIR/profiles/$profile.sh"
  else
    local known=("$HPT_LAUNCH_DIR"/profiles/*.sh)
    known=("${known[@]##*/}")
    hpt_die "HPT_PROFILE=$profile is neither a file nor one of: ${known[*]%.sh}"
  fi
  if [[ -n ${HPT_SRC:-} ]]; then
    export PYTHONPATH="$HPT_SRC${PYTHONPATH:+:$PYTHONPATH}"
  fi
  export PYTHONUNBUFFERED=1
}

# hpt_node_addr NODE: the address SLURM reaches NODE at (its NodeAddr; on most
# clusters the hostname itself). Emulated nodes on one host share 127.0.0.1.
hpt_node_addr() {
  local addr
  addr=$(scontrol show node "$1" -o 2>/dev/null | tr ' ' '\n' | sed -n 's/^NodeAddr=//p')
  printf '%s\n' "${addr:-$1}"
}

# hpt_read_allocation: HPT_NODES (array of node names, allocation order),
# MASTER_ADDR (the first node's address) and MASTER_PORT.
hpt_read_allocation() {
  [[ -n ${SLURM_JOB_ID:-} ]] || hpt_die "not inside a SLURM job: submit with sbatch"
  mapfile -t HPT_NODES < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
  MASTER_ADDR=$(hpt_node_addr "${HPT_NODES[0]}")
  # A port per job, so that two jobs sharing a node do not collide.
  MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
  export MASTER_ADDR MASTER_PORT
  hpt_log "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}): nodes ${HPT_NODES[*]}, master $MASTER_ADDR:$MASTER_PORT"
}

# hpt_container_args: srun flags that run a step in CONTAINER_IMAGE (pyxis/enroot);
# nothing when CONTAINER_IMAGE is empty (bare metal, or already inside a container).
hpt_container_args() {
  HPT_CONTAINER_ARGS=()
  if [[ -n ${CONTAINER_IMAGE:-} ]]; then
    HPT_CONTAINER_ARGS=(--container-image="$CONTAINER_IMAGE" --no-container-mount-home)
    [[ -n ${CONTAINER_MOUNTS:-} ]] && HPT_CONTAINER_ARGS+=(--container-mounts="$CONTAINER_MOUNTS")
    [[ -n ${CONTAINER_WORKDIR:-} ]] && HPT_CONTAINER_ARGS+=(--container-workdir="$CONTAINER_WORKDIR")
  fi
  return 0
}

# hpt_start_rollout_servers NODES OFFSET: start SERVERS_PER_NODE rollout servers on
# each of the comma-separated NODES, the first on accelerator OFFSET. Sets
# HPT_SERVER_PID (the srun in the background) and HPT_ROLLOUT_URLS ([u1,u2,...]).
hpt_start_rollout_servers() {
  local nodes=$1 offset=$2 node i addr urls=()
  local -a cmd=(srun --nodes="$(tr ',' '\n' <<<"$nodes" | wc -l)" --nodelist="$nodes"
    --ntasks-per-node="$SERVERS_PER_NODE" --job-name=hpt-rollout --overlap --kill-on-bad-exit=0
    "${HPT_CONTAINER_ARGS[@]}"
    env HPT_ROLLOUT_GPU_OFFSET="$offset" bash "$HPT_LAUNCH_DIR/rollout_server.sh")
  for node in ${nodes//,/ }; do
    addr=$(hpt_node_addr "$node")
    for ((i = 0; i < SERVERS_PER_NODE; i++)); do
      urls+=("http://$addr:$((ROLLOUT_BASE_PORT + i))")
    done
  done
  HPT_ROLLOUT_URLS="[$(IFS=,; echo "${urls[*]}")]"
  hpt_log "rollout servers ($ROLLOUT_SERVER, $SERVERS_PER_NODE per node on $nodes): $HPT_ROLLOUT_URLS"
  hpt_show_cmd "${cmd[@]}"
  if [[ ${HPT_DRY_RUN:-0} == 1 ]]; then
    HPT_SERVER_PID=
    return 0
  fi
  "${cmd[@]}" &
  HPT_SERVER_PID=$!
  hpt_wait_healthy "${urls[@]}"
}

# hpt_wait_healthy URL...: wait until every server answers GET /health with 200,
# failing early when the server step dies or ROLLOUT_STARTUP_TIMEOUT_S passes.
hpt_wait_healthy() {
  local deadline=$((SECONDS + ${ROLLOUT_STARTUP_TIMEOUT_S:-600})) url pending
  while :; do
    pending=()
    for url in "$@"; do
      "$HPT_PYTHON" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1] + "/health", timeout=5)' "$url" \
        >/dev/null 2>&1 || pending+=("$url")
    done
    ((${#pending[@]} == 0)) && { hpt_log "rollout servers are up"; return 0; }
    if [[ -n ${HPT_SERVER_PID:-} ]] && ! kill -0 "$HPT_SERVER_PID" 2>/dev/null; then
      hpt_die "the rollout server step exited before ${pending[*]} answered /health"
    fi
    ((SECONDS < deadline)) || hpt_die "rollout servers ${pending[*]} not healthy after ${ROLLOUT_STARTUP_TIMEOUT_S:-600} s"
    ((HPT_PREEMPTED)) && return 0
    sleep 2
  done
}

# hpt_stop_rollout_servers: end the server step (servers hold no state).
hpt_stop_rollout_servers() {
  if [[ -n ${HPT_SERVER_PID:-} ]] && kill -0 "$HPT_SERVER_PID" 2>/dev/null; then
    scancel --signal=TERM "$(hpt_step_ids hpt-rollout)" 2>/dev/null || kill "$HPT_SERVER_PID" 2>/dev/null || true
    hpt_wait "$HPT_SERVER_PID" || true
  fi
  return 0
}

# hpt_step_ids NAME: the ids (JOB.STEP) of this job's running steps named NAME.
hpt_step_ids() {
  squeue --steps --jobs="$SLURM_JOB_ID" --noheader --format='%i %j' 2>/dev/null |
    awk -v name="$1" '$2 == name {print $1}' | paste -sd, -
}

# Pre-emption. SLURM sends USR1 (sbatch --signal=B:USR1@120) or TERM to this batch
# shell only. Forward TERM to the trainer step with `scancel --signal=TERM JOB.STEP`:
# srun then delivers it to every task (torchrun, which passes it to its ranks).
# `kill -TERM <srun pid>` or `scancel --full` would make srun SIGKILL the tasks.
HPT_PREEMPTED=0
hpt_on_preempt() {
  HPT_PREEMPTED=1
  local steps
  steps=$(hpt_step_ids hpt-trainer)
  hpt_log "pre-emption signal: asking the trainer (${steps:-not started}) to checkpoint and exit"
  if [[ -n $steps ]]; then
    scancel --signal=TERM "$steps" || true
  fi
}
hpt_trap_preemption() { trap hpt_on_preempt USR1 TERM; }

# hpt_wait PID: wait for a background step; a trapped signal interrupts `wait`
# (status > 128 while the step still runs), so wait again until it really ends.
hpt_wait() {
  local pid=$1 rc
  while :; do
    rc=0
    wait "$pid" || rc=$?
    if ((rc > 128)) && kill -0 "$pid" 2>/dev/null; then
      continue
    fi
    return "$rc"
  done
}

# hpt_train NODES NNODES OVERRIDES...: run the trainer with torchrun on NODES, one
# torchrun per node with NPROC_PER_NODE ranks, c10d rendezvous at MASTER_ADDR.
# Returns the trainer's exit status (0 after a pre-emption checkpoint).
hpt_train() {
  local nodes=$1 nnodes=$2
  shift 2
  # torchrun gives its ranks this long to write the pre-emption checkpoint before
  # SIGKILL (its default is 30 s); keep it below the --signal lead time.
  export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${CHECKPOINT_GRACE_S:-100}
  local -a cmd=(srun --nodes="$nnodes" --nodelist="$nodes" --ntasks-per-node=1 --job-name=hpt-trainer
    --kill-on-bad-exit=1 "${HPT_TRAINER_SRUN_ARGS[@]}" "${HPT_CONTAINER_ARGS[@]}"
    "$HPT_PYTHON" -m torch.distributed.run
    --nnodes="$nnodes" --nproc-per-node="$NPROC_PER_NODE"
    --rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv-id="hpt-$SLURM_JOB_ID"
    -m megatron_hpt.cli train --recipe "$RECIPE" --resume
    "run.output_dir=$OUTPUT_DIR" "$@")
  hpt_show_cmd "${cmd[@]}"
  [[ ${HPT_DRY_RUN:-0} == 1 ]] && return 0
  if ((HPT_PREEMPTED)); then
    hpt_log "pre-empted before the trainer started"
    return 0
  fi
  "${cmd[@]}" &
  local pid=$! rc=0
  hpt_wait "$pid" || rc=$?
  return "$rc"
}

# hpt_finish RC: requeue after a pre-emption (the requeued job resumes from the
# checkpoint the trainer just wrote); otherwise exit with the trainer's status.
hpt_finish() {
  local rc=$1
  hpt_stop_rollout_servers
  if ((HPT_PREEMPTED)); then
    hpt_log "trainer exited with status $rc after the pre-emption signal; requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID" || hpt_die "scontrol requeue failed: submit with --requeue"
    exit 0
  fi
  hpt_log "trainer exited with status $rc"
  exit "$rc"
}
