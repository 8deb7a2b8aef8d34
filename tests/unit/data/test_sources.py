"""Local paths never fall through to a hub lookup: a mistyped path is an error naming
it at once, with no network call attempted (the hub and sockets are stubbed to fail)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

import megatron_hpt.data.sources as sources
from megatron_hpt.config import InputNotFoundError
from megatron_hpt.data.chat import load_tokenizer

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture
def no_network(monkeypatch):
    """Any hub lookup or socket connection fails the test; hub lookups that were allowed are listed."""
    allowed = []

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(sources, "read_hub", lambda name, split, config_name=None: allowed.append(name))
    monkeypatch.chdir(REPO)
    return allowed


@pytest.mark.parametrize(
    "path,why",
    [
        ("data/arithmetic/trian", "a hub dataset name looks like owner/name"),
        ("data/trian", "data/ is a local folder"),
        ("trian", "a hub dataset name looks like owner/name"),
        ("arithmetic/train.parquet", "it ends in .parquet"),
        ("./trian", "it is written as a file-system path"),
        ("/no/such/dir", "it is written as a file-system path"),
    ],
)
def test_a_missing_local_path_is_an_error_without_a_hub_lookup(no_network, path, why):
    with pytest.raises(InputNotFoundError) as err:
        sources.read_rows(path)
    message = str(err.value)
    assert message.startswith(f"dataset={path!r} does not exist (read as a local path: {why})")
    assert "hf:owner/name" in message
    assert no_network == []


def test_hub_names_are_owner_name_or_hf_prefixed(no_network):
    sources.read_rows("open-r1/OpenR1-Math-220k")
    sources.read_rows("hf:gsm8k")
    assert no_network == ["open-r1/OpenR1-Math-220k", "gsm8k"]
    assert sources.read_rows("data/arithmetic/eval.parquet").rows  # an existing path is local


def test_a_missing_tokenizer_directory_is_an_error_without_a_hub_lookup(no_network, monkeypatch):
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("tokenizer hub lookup attempted")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", refuse)
    with pytest.raises(InputNotFoundError, match="tokenizer 'Qwen/Qwen2.5-Math-7B' does not exist"):
        load_tokenizer("Qwen/Qwen2.5-Math-7B")
