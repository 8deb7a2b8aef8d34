# shellcheck shell=bash
# GPU profile (the default): NVIDIA nodes, NCCL, SGLang rollout servers, the image
# built from the repository's Dockerfile. Each line is a default; a variable set
# in the environment (sbatch --export=ALL,NAME=value) wins.

: "${HPT_PYTHON:=python}"                         # the trainer's Python (the image's, with TE and apex)
: "${GPUS_PER_NODE:=${SLURM_GPUS_ON_NODE:-8}}"    # accelerators per node: one trainer rank or 1/ROLLOUT_TP server each
: "${ROLLOUT_SERVER:=sglang}"                     # sglang | own
: "${ROLLOUT_DEVICE:=cuda}"
: "${SGLANG_PYTHON:=/opt/sglang/bin/python}"      # the image keeps SGLang (and its own torch) in a separate venv
: "${ROLLOUT_BASE_PORT:=30000}"                   # server i on a node listens on ROLLOUT_BASE_PORT + i
: "${ROLLOUT_STARTUP_TIMEOUT_S:=900}"             # loading a 7B model and capturing CUDA graphs takes minutes
: "${OMP_NUM_THREADS:=8}"
export OMP_NUM_THREADS
