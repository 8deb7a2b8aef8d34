"""Fixtures of the rollout tests: the tiny model, HF references computed in-process,
SGLang's own JSON contract, and helpers that start and stop servers."""

from __future__ import annotations

from pathlib import Path

import pytest

from megatron_hpt.rollout import SGLangEngine
from megatron_hpt.rollout.sglang_cpu.contract import load_contract
from rollout_testlib import ContractChecker, hf_reference_model, own_engine_config


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from megatron_hpt.models.tiny import create_tiny_model

    return create_tiny_model(tmp_path_factory.mktemp("rollout_tiny"))


@pytest.fixture(scope="session")
def hf_model(tiny_model_dir):
    return hf_reference_model(tiny_model_dir)


@pytest.fixture(scope="session")
def sglang_api():
    """SGLang 0.5.23's api_types module, extracted from its wheel into .cache/."""
    return load_contract()


@pytest.fixture(scope="session")
def contract(sglang_api) -> ContractChecker:
    return ContractChecker(sglang_api)


@pytest.fixture(scope="module")
def weight_dir(tmp_path_factory) -> Path:
    """The folder the module's own server may load weights from (a run's weights_sync)."""
    return tmp_path_factory.mktemp("weights_sync")


@pytest.fixture(scope="module")
def own_engine(tiny_model_dir, contract, tmp_path_factory, weight_dir):
    """One own server for the module, behind an engine whose requests are contract-checked."""
    cfg = own_engine_config(log_dir=str(tmp_path_factory.mktemp("own_server_logs")), weight_dir=str(weight_dir))
    engine = SGLangEngine.from_config(cfg, str(tiny_model_dir), observer=contract.observe_request)
    yield engine
    engine.close()
    assert not contract.errors, contract.errors
