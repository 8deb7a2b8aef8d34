"""Fixtures of the rollout stage's end-to-end tests (a server fuzzed on every route, a server
outliving a SIGKILLed trainer): the tiny model, its HF reference, and the helper modules the
rollout unit tests use (``tests/unit/rollout``)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "unit" / "rollout"))
from rollout_testlib import hf_reference_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_qwen2) -> Path:
    return tiny_qwen2


@pytest.fixture(scope="session")
def hf_model(tiny_model_dir):
    return hf_reference_model(tiny_model_dir)
