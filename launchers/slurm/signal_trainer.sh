#!/usr/bin/env bash
# Send SIGTERM to this job's torchrun agent(s) on this node, and to nothing else.
#
# common.sh runs it as one task per trainer node (srun --overlap, outside any
# container: pyxis shares the host's process ids) when the batch script gets a
# pre-emption signal. torchrun forwards the TERM to its ranks, which finish the
# step, write a checkpoint and exit. A step-wide `scancel --signal=TERM JOB.STEP`
# would also reach every helper process of the ranks (the rollout server a rank
# launched, reward workers, megatron's checkpoint writer) while the step that
# must still finish and save needs them.
#
# A torchrun agent of the trainer step is a process whose environment has this
# job, the trainer's step and this node, and whose command line runs
# torch.distributed.run (the ranks run megatron_hpt.cli; srun itself has no step).
set -euo pipefail
: "${HPT_TRAINER_STEP:?set to the trainer step, JOB.STEP}"
job=${HPT_TRAINER_STEP%%.*}
step=${HPT_TRAINER_STEP#*.}
node=${SLURMD_NODENAME:?}

signalled=()
for proc in /proc/[0-9]*; do
  pid=${proc#/proc/}
  [[ $pid == "$$" ]] && continue
  env_lines=$(tr '\0' '\n' <"$proc/environ" 2>/dev/null) || continue
  grep -qxF "SLURM_JOB_ID=$job" <<<"$env_lines" || continue
  grep -qxF "SLURM_STEP_ID=$step" <<<"$env_lines" || continue
  grep -qxF "SLURMD_NODENAME=$node" <<<"$env_lines" || continue
  tr '\0' '\n' <"$proc/cmdline" 2>/dev/null | grep -qxF "torch.distributed.run" || continue
  kill -TERM "$pid" 2>/dev/null && signalled+=("$pid")
done
echo "signal_trainer: TERM to torchrun ${signalled[*]:-(none found)} on $node (step $HPT_TRAINER_STEP)"
((${#signalled[@]} > 0))
