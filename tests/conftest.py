"""Shared fixtures: the tiny HF checkpoints every stage's tests use."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory):
    """The embedded default model (random-init Qwen2 with a local tokenizer)."""
    from megatron_hpt.models.tiny import create_tiny_model

    return create_tiny_model(tmp_path_factory.mktemp("tiny_qwen2"))
