# shellcheck shell=bash
# CPU profile: no accelerators, gloo, the project's own rollout server. It runs the
# same scripts on a laptop-sized SLURM cluster (the launcher tests use it with the
# demo recipe). Each line is a default; the environment wins.

: "${HPT_PYTHON:=python3}"                        # a Python with megatron-hpt installed (or HPT_SRC on PYTHONPATH)
: "${GPUS_PER_NODE:=2}"                           # rank slots per node: trainer ranks, or rollout servers
: "${ROLLOUT_SERVER:=own}"                        # python -m megatron_hpt.rollout.server
: "${ROLLOUT_DEVICE:=cpu}"
: "${ROLLOUT_BASE_PORT:=30000}"
: "${ROLLOUT_STARTUP_TIMEOUT_S:=120}"
# One thread per process: oversubscribed OpenMP threads spin and slow CPU runs many times.
: "${OMP_NUM_THREADS:=1}"
export OMP_NUM_THREADS
