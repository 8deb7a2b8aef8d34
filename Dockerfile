# megatron-hpt: the image the SLURM and NeMo-Run launchers run in.
#
#   docker build -t megatron-hpt:0.1.0 .
#   docker run --gpus all --rm megatron-hpt:0.1.0 megatron-hpt demo
#   enroot import -o megatron-hpt.sqsh dockerd://megatron-hpt:0.1.0   # for pyxis: CONTAINER_IMAGE=$PWD/megatron-hpt.sqsh
#
# What goes where:
# - NGC PyTorch base: CUDA torch, Transformer Engine, apex, NCCL. Its torch, TE and apex
#   are held at the image's versions (a constraint file made from the image itself).
# - megatron-core and this package in the image's Python (the trainer, converters).
# - SGLang in its own venv, /opt/sglang (the launchers' SGLANG_PYTHON): it pins its own
#   torch, which must not replace the trainer's. Rollout servers only talk HTTP/NCCL.
# - NeMo-Run in its own venv, /opt/nemo-run, pinned by constraints/launch.txt (the same
#   file `make launch-env` uses); it only builds and submits jobs.
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.04-py3
FROM ${BASE_IMAGE}

ARG MEGATRON_CORE_VERSION=0.19.2
ARG SGLANG_VERSION=0.5.23
ARG UV_VERSION=0.13.9

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    UV_NO_CACHE=1 \
    PYTHONUNBUFFERED=1

# uv makes the side venvs (the base image need not have python3-venv).
RUN pip install --no-cache-dir "uv==${UV_VERSION}"

RUN uv venv --python "$(command -v python)" /opt/sglang \
    && uv pip install --python /opt/sglang/bin/python "sglang==${SGLANG_VERSION}" \
    && /opt/sglang/bin/python -c "import sglang; print('sglang', sglang.__version__)"

WORKDIR /opt/megatron-hpt
COPY constraints/ constraints/
RUN uv venv --python "$(command -v python)" /opt/nemo-run \
    && uv pip install --python /opt/nemo-run/bin/python -c constraints/launch.txt nemo-run leptonai \
    && /opt/nemo-run/bin/python -c "import nemo_run"

COPY . .
RUN pip list --format=freeze \
      | grep -iE '^(torch|transformer[-_]engine[-_a-z0-9]*|apex|flash[-_]attn|triton|pytorch[-_]triton|nvidia[-_a-z0-9]*)==' \
      > /tmp/base-image-pins.txt \
    && pip install --no-cache-dir -c /tmp/base-image-pins.txt "megatron-core==${MEGATRON_CORE_VERSION}" . \
    && python -c "import megatron.core, megatron_hpt.cli; print('megatron-core', megatron.core.__version__)"

ENV PATH="${PATH}:/opt/nemo-run/bin"
