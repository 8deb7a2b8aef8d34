"""Shared session fixtures: the tiny HF checkpoints every stage's tests use, and
their converted dist checkpoints (created once per session and reused by unit
and multi-rank tests); the collective-device check switched on for every rank."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from megatron_hpt.parallel.collectives import CHECK_ENV

# Every rank started by the tests (multi-rank tests, trainer runs, in-process ranks) checks
# that the tensors it hands to collectives are on the group's device, simulating NCCL on
# this CPU machine (megatron_hpt/parallel/collectives.py).
os.environ.setdefault(CHECK_ENV, "1")


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory):
    """The embedded default model (random-init Qwen2 with a local tokenizer)."""
    from megatron_hpt.models.tiny import create_tiny_model

    return create_tiny_model(tmp_path_factory.mktemp("tiny_qwen2"))


@pytest.fixture(scope="session")
def tiny_hf_models(tmp_path_factory) -> dict[str, Path]:
    """Three tiny random HF checkpoints: Qwen2 (GQA 4/2 heads, qkv bias, untied),
    Qwen2 with tied embeddings, and Llama with Llama-3 rope scaling."""
    from megatron_hpt.models.tiny import LLAMA3_ROPE_SCALING, TinyModelSpec, create_tiny_model

    root = tmp_path_factory.mktemp("tiny_hf")
    specs = {
        "qwen2": TinyModelSpec(seed=1),
        "qwen2_tied": TinyModelSpec(tie_word_embeddings=True, seed=2),
        "llama": TinyModelSpec(architecture="LlamaForCausalLM", rope_scaling=dict(LLAMA3_ROPE_SCALING), seed=3),
    }
    return {name: create_tiny_model(root / name, spec) for name, spec in specs.items()}


@pytest.fixture(scope="session")
def converted_checkpoints(tiny_hf_models, tmp_path_factory) -> dict[str, Path]:
    """Each tiny model converted by hf_to_megatron (unverified here: the tests verify)."""
    from megatron_hpt.models.conversion import convert_hf_to_megatron

    root = tmp_path_factory.mktemp("converted")
    out = {}
    for name, hf_dir in tiny_hf_models.items():
        convert_hf_to_megatron(hf_dir, root / name, verify=False, log=lambda *_: None)
        out[name] = root / name
    return out
