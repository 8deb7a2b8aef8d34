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
# Sets HPT_STEP_LAUNCH_DIR, this folder as the steps see it (in the image: the
# Dockerfile's /opt/megatron-hpt).
hpt_container_args() {
  HPT_CONTAINER_ARGS=()
  HPT_STEP_LAUNCH_DIR=$HPT_LAUNCH_DIR
  if [[ -n ${CONTAINER_IMAGE:-} ]]; then
    HPT_STEP_LAUNCH_DIR=${CONTAINER_LAUNCH_DIR:-/opt/megatron-hpt/launchers/slurm}
    HPT_CONTAINER_ARGS=(--container-image="$CONTAINER_IMAGE" --no-container-mount-home)
    [[ -n ${CONTAINER_MOUNTS:-} ]] && HPT_CONTAINER_ARGS+=(--container-mounts="$CONTAINER_MOUNTS")
    [[ -n ${CONTAINER_WORKDIR:-} ]] && HPT_CONTAINER_ARGS+=(--container-workdir="$CONTAINER_WORKDIR")
  fi
  return 0
}

# hpt_new_secret: 32 random bytes as hex (API keys, launch tokens).
hpt_new_secret() { od -An -tx1 -N32 /dev/urandom | tr -d ' \n'; }

# hpt_start_rollout_servers NODES OFFSET REMOTE: start SERVERS_PER_NODE rollout servers
# on each of the comma-separated NODES, the first on accelerator OFFSET. REMOTE=1: the
# trainer runs on other nodes, so the servers listen on every interface and need an API
# key (ROLLOUT_API_KEY, else a new one for this job); REMOTE=0: loopback only (a key
# only when ROLLOUT_API_KEY is given). Every server gets this job's launch token. Sets
# HPT_SERVER_PID (the srun in the background), HPT_ROLLOUT_URLS ([u1,u2,...]) and
# HPT_ROLLOUT_ATTACH (the trainer's rollout overrides).
hpt_start_rollout_servers() {
  local nodes=$1 offset=$2 remote=$3 node i addr urls=() nnodes
  nnodes=$(tr ',' '\n' <<<"$nodes" | wc -l)
  HPT_ROLLOUT_API_KEY=${ROLLOUT_API_KEY:-}
  if ((remote)); then
    ROLLOUT_HOST=0.0.0.0
    HPT_ROLLOUT_API_KEY=${HPT_ROLLOUT_API_KEY:-$(hpt_new_secret)}
  else
    ROLLOUT_HOST=127.0.0.1
  fi
  HPT_ROLLOUT_LAUNCH_TOKEN=$(hpt_new_secret)
  ROLLOUT_WEIGHT_DIR=${ROLLOUT_WEIGHT_DIR:-$OUTPUT_DIR/weights_sync}  # where the trainer writes disk syncs
  # What rollout_server.sh reads, in the step's environment (srun passes ours on; the
  # trainer's ranks read the key from HPT_ROLLOUT_API_KEY: rollout.api_key=env:...).
  export ROLLOUT_SERVER ROLLOUT_MODEL ROLLOUT_TP ROLLOUT_BASE_PORT ROLLOUT_DEVICE ROLLOUT_SERVER_ARGS HPT_PYTHON SGLANG_PYTHON
  export ROLLOUT_HOST ROLLOUT_MEM_FRACTION GPUS_PER_NODE HPT_ROLLOUT_API_KEY HPT_ROLLOUT_LAUNCH_TOKEN ROLLOUT_WEIGHT_DIR
  local -a cmd=(srun --nodes="$nnodes" --ntasks="$((nnodes * SERVERS_PER_NODE))" --nodelist="$nodes"
    --ntasks-per-node="$SERVERS_PER_NODE" --job-name=hpt-rollout --overlap --kill-on-bad-exit=0
    "${HPT_CONTAINER_ARGS[@]}"
    env HPT_ROLLOUT_GPU_OFFSET="$offset" bash "$HPT_STEP_LAUNCH_DIR/rollout_server.sh")
  for node in ${nodes//,/ }; do
    addr=127.0.0.1
    ((remote)) && addr=$(hpt_node_addr "$node")
    for ((i = 0; i < SERVERS_PER_NODE; i++)); do
      urls+=("http://$addr:$((ROLLOUT_BASE_PORT + i))")
    done
  done
  HPT_ROLLOUT_URLS="[$(IFS=,; echo "${urls[*]}")]"
  # Servers on GPUs of their own: nothing to release for the training step.
  HPT_ROLLOUT_ATTACH=(rollout.engine=attach "rollout.urls=$HPT_ROLLOUT_URLS" rollout.colocated=false)
  [[ -n $HPT_ROLLOUT_API_KEY ]] && HPT_ROLLOUT_ATTACH+=(rollout.api_key=env:HPT_ROLLOUT_API_KEY)
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

# hpt_http_get URL PATH: the whole answer (status line, headers, body) to GET PATH with
# the job's API key (bash's /dev/tcp: no curl or Python needed on the batch node);
# fails when nothing answers.
hpt_http_get() {
  local hostport=${1#http://} auth=
  [[ -n ${HPT_ROLLOUT_API_KEY:-} ]] && auth="Authorization: Bearer $HPT_ROLLOUT_API_KEY"$'\r\n'
  (
    exec 3<>"/dev/tcp/${hostport%:*}/${hostport##*:}" || exit 1
    printf 'GET %s HTTP/1.0\r\nHost: %s\r\n%s\r\n' "$2" "${hostport%:*}" "$auth" >&3
    IFS= read -r -d '' -t 30 reply <&3 || [[ -n $reply ]] || exit 1
    printf '%s' "$reply"
  ) 2>/dev/null
}

# hpt_server_state URL: "ready" (this job's launch token in /server_info and
# /health_generate 200), "starting" (nothing answers yet, or 5xx) or "foreign" (another
# server answers on the port: another job's, or one that refuses this job's key).
hpt_server_state() {
  local reply status
  reply=$(hpt_http_get "$1" /server_info) || { echo starting; return 0; }
  read -r _ status _ <<<"$reply"
  if [[ $status == 5* ]]; then
    echo starting
  elif [[ $status != 200 || $reply != *"$HPT_ROLLOUT_LAUNCH_TOKEN"* ]]; then
    echo foreign
  else
    reply=$(hpt_http_get "$1" /health_generate) || { echo starting; return 0; }
    read -r _ status _ <<<"$reply"
    if [[ $status == 200 ]]; then echo ready; else echo starting; fi
  fi
}

# hpt_wait_healthy URL...: wait until every server is this job's and healthy, failing
# at once on a foreign server, early when the server step dies, or after
# ROLLOUT_STARTUP_TIMEOUT_S.
hpt_wait_healthy() {
  local deadline=$((SECONDS + ${ROLLOUT_STARTUP_TIMEOUT_S:-600})) url pending state
  while :; do
    pending=()
    for url in "$@"; do
      state=$(hpt_server_state "$url")
      [[ $state == foreign ]] && hpt_die "another server answers at $url (not this job's: wrong launch token or API key); refusing it"
      [[ $state == ready ]] || pending+=("$url")
    done
    ((${#pending[@]} == 0)) && { hpt_log "rollout servers are up"; return 0; }
    if [[ -n ${HPT_SERVER_PID:-} ]] && ! kill -0 "$HPT_SERVER_PID" 2>/dev/null; then
      hpt_die "the rollout server step exited before ${pending[*]} answered /health"
    fi
    ((SECONDS < deadline)) || hpt_die "rollout servers ${pending[*]} not ready after ${ROLLOUT_STARTUP_TIMEOUT_S:-600} s"
    ((HPT_PREEMPTED)) && return 0
    sleep 1
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
# shell only. Forward TERM to the trainer's torchrun agents alone (signal_trainer.sh,
# one task per trainer node): torchrun passes it to its ranks, which checkpoint and
# exit. Fallback when that finds none: `scancel --signal=TERM JOB.STEP`, which
# reaches every process of the step. Never `kill -TERM <srun pid>` or
# `scancel --full`: srun then SIGKILLs the tasks.
HPT_PREEMPTED=0
hpt_on_preempt() {
  HPT_PREEMPTED=1
  local step
  step=$(hpt_step_ids hpt-trainer)
  hpt_log "pre-emption signal: asking the trainer (${step:-not started}) to checkpoint and exit"
  [[ -n $step ]] || return 0
  srun --overlap --nodes="$HPT_TRAINER_NNODES" --ntasks="$HPT_TRAINER_NNODES" --nodelist="$HPT_TRAINER_NODES" \
    --ntasks-per-node=1 --job-name=hpt-signal --kill-on-bad-exit=0 \
    env HPT_TRAINER_STEP="$step" bash "$HPT_LAUNCH_DIR/signal_trainer.sh" ||
    scancel --signal=TERM "$step" || true
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

# hpt_data_parallel NNODES OVERRIDES...: the data_parallel_size=N override for
# NNODES x NPROC_PER_NODE ranks and the recipe's TP x PP (launchers/recipe_layout.py,
# run where the package is: in the image when there is one).
hpt_data_parallel() {
  local nnodes=$1
  shift
  local -a cmd=("$HPT_PYTHON" "$HPT_STEP_LAUNCH_DIR/../recipe_layout.py" "$RECIPE" "$((nnodes * NPROC_PER_NODE))" "$@")
  if [[ -n ${CONTAINER_IMAGE:-} && ${HPT_DRY_RUN:-0} != 1 ]]; then
    cmd=(srun --nodes=1 --ntasks=1 --overlap --job-name=hpt-layout "${HPT_CONTAINER_ARGS[@]}" "${cmd[@]}")
  elif [[ -n ${CONTAINER_IMAGE:-} ]]; then
    cmd[1]="$HPT_LAUNCH_DIR/../recipe_layout.py"  # a dry run reads the recipe here
  fi
  "${cmd[@]}" || hpt_die "cannot lay out $((nnodes * NPROC_PER_NODE)) trainer ranks for recipe $RECIPE"
}

# hpt_train NODES NNODES OVERRIDES...: run the trainer with torchrun on NODES, one
# torchrun per node with NPROC_PER_NODE ranks, c10d rendezvous at MASTER_ADDR.
# Returns the trainer's exit status (0 after a pre-emption checkpoint).
hpt_train() {
  local nodes=$1 nnodes=$2 data_parallel
  shift 2
  data_parallel=$(hpt_data_parallel "$nnodes" "$@")
  # torchrun gives its ranks this long to write the pre-emption checkpoint before
  # SIGKILL (its default is 30 s); keep it below the --signal lead time.
  export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${CHECKPOINT_GRACE_S:-100}
  HPT_TRAINER_NODES=$nodes
  HPT_TRAINER_NNODES=$nnodes
  local -a cmd=(srun --nodes="$nnodes" --ntasks="$nnodes" --nodelist="$nodes" --ntasks-per-node=1 --job-name=hpt-trainer
    --kill-on-bad-exit=1 "${HPT_TRAINER_SRUN_ARGS[@]}" "${HPT_CONTAINER_ARGS[@]}"
    "$HPT_PYTHON" -m torch.distributed.run
    --nnodes="$nnodes" --nproc-per-node="$NPROC_PER_NODE"
    --rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv-id="hpt-$SLURM_JOB_ID"
    -m megatron_hpt.cli train --recipe "$RECIPE" --resume
    "output_dir=$OUTPUT_DIR" "$data_parallel" "$@")
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
