"""The checkpoint-writer helper starts with pre-emption signals blocked, under the name each
megatron-core release gives its starter (``_get_write_results_queue`` up to 0.16,
``get_write_results_queue`` from 0.17), and an unknown megatron is an error, not a silent
unshielded writer."""

from __future__ import annotations

import signal
import types

import pytest

from megatron_hpt.models import checkpoint as ckpt


def _fake_module(name: str | None, calls: list):
    module = types.ModuleType("megatron.core.dist_checkpointing.strategies.filesystem_async")
    module._results_queue = None
    if name is not None:
        def start(*args, **kwargs):
            calls.append(signal.pthread_sigmask(signal.SIG_BLOCK, []))  # the mask while it runs
            module._results_queue = object()
            return module._results_queue

        setattr(module, name, start)
    return module


@pytest.fixture()
def fake_writer(monkeypatch):
    from megatron.core.dist_checkpointing import strategies

    def install(name):
        calls: list = []
        monkeypatch.setattr(strategies, "filesystem_async", _fake_module(name, calls), raising=False)
        return calls

    return install


@pytest.mark.parametrize("name", ["get_write_results_queue", "_get_write_results_queue"])
def test_writer_starts_with_pre_emption_signals_blocked(fake_writer, name):
    calls = fake_writer(name)
    before = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    ckpt._start_checkpoint_writer_shielded()
    assert len(calls) == 1
    assert {signal.SIGTERM, signal.SIGUSR1, signal.SIGINT} <= calls[0]
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == before  # unblocked again afterwards
    ckpt._start_checkpoint_writer_shielded()  # started once per process
    assert len(calls) == 1


def test_unknown_writer_starter_is_an_error(fake_writer):
    fake_writer(None)
    with pytest.raises(RuntimeError, match="neither of get_write_results_queue / _get_write_results_queue.*SIGTERM"):
        ckpt._start_checkpoint_writer_shielded()


def test_installed_megatron_has_a_known_starter():
    import importlib.metadata

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    start = ckpt.write_results_queue_factory(filesystem_async)
    version = tuple(int(x) for x in importlib.metadata.version("megatron-core").split(".")[:2])
    assert start.__name__ == ("get_write_results_queue" if version >= (0, 17) else "_get_write_results_queue")
