"""Weight versions are a contract: launched servers start with the launch version, every
completion carries the version it was generated with, a recovered server serves again
only with the current weights (a disk reload it retries until it succeeds, or a new
distributed update), a server that stops generating is restarted, and sync failures
name the server."""

from __future__ import annotations

import signal
import threading
import time

import psutil
import pytest

from megatron_hpt.rollout import (
    Completion,
    SamplingParams,
    SGLangEngine,
    StaleSamples,
    WeightsNeeded,
    WeightSyncError,
    count_stale,
    weight_transport,
)
from megatron_hpt.rollout.launcher import LAUNCH_VERSION
from rollout_testlib import hf_greedy, model_with, own_engine_config, perturbed_weights

PROMPTS = [[1, 40, 50, 60], [1, 41, 52, 7]]
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=10)


def _greedy_ids(engine) -> list[list[int]]:
    return [row[0].output_ids for row in engine.generate(PROMPTS, 1, GREEDY, seed=0)]


def _versions(engine) -> set[str]:
    return {c.weight_version for row in engine.generate(PROMPTS, 2, GREEDY, seed=0) for c in row}


def _server_pid(engine, i: int = 0) -> int:
    """The server process itself (the child of its parent_watch wrapper)."""
    return psutil.Process(engine.processes[i].proc.pid).children()[0].pid


def test_count_stale():
    def c(version, server="http://a:1"):
        return Completion([1], [0.0], "stop", {"weight_version": version, "server": server})

    groups = [[c("3"), c("3")], [c("2", "http://b:2"), c("3")]]
    assert count_stale(groups, "3", refuse=False) == 1
    assert count_stale(groups, "2", refuse=False) == 3
    with pytest.raises(StaleSamples, match=r"1 of 4 samples were not generated with weight version '3': "
                                           r"http://b:2 served version '2'"):
        count_stale(groups, "3", refuse=True)


def test_launched_servers_start_with_the_launch_version(own_engine):
    assert own_engine.weight_version == LAUNCH_VERSION
    assert _versions(own_engine) == {LAUNCH_VERSION}


def test_restarted_server_waits_for_the_next_distributed_update(tiny_model_dir, hf_model, tmp_path):
    new = perturbed_weights(hf_model, seed=7)
    new_ids = [hf_greedy(model_with(tiny_model_dir, new), p, 10) for p in PROMPTS]
    cfg = own_engine_config(log_dir=str(tmp_path), retry_backoff_s=0.1, weight_dir=str(tmp_path))
    with SGLangEngine.from_config(cfg, str(tiny_model_dir)) as engine:
        engine.update_weights_from_distributed(new.items(), "7")
        assert _greedy_ids(engine) == new_ids and _versions(engine) == {"7"}
        engine.processes[0].kill()
        # Restarted with the launch weights, and no disk copy of version 7 exists:
        # it must not serve until the trainer sends them again.
        with pytest.raises(WeightsNeeded, match=r"no rollout server holds weight version '7'.*wait for a distributed"):
            engine.generate(PROMPTS, 1, GREEDY, seed=0)
        assert engine.processes[0].restarts == 1
        engine.update_weights_from_distributed(new.items(), "7")  # a new group: the old one died with the server
        assert _greedy_ids(engine) == new_ids and _versions(engine) == {"7"}


def test_server_killed_during_a_distributed_update(tiny_model_dir, hf_model, tmp_path):
    """The send fails with our error naming the server; the trainer aborts, the next
    update waits for the restart and includes it in a new group."""
    new = perturbed_weights(hf_model, seed=8)
    cfg = own_engine_config(log_dir=str(tmp_path), retry_backoff_s=0.1, weight_dir=str(tmp_path))
    with SGLangEngine.from_config(cfg, str(tiny_model_dir)) as engine:
        engine.begin_weight_update()
        target = engine.weight_sync_target(0)
        sender = target.open_sender()
        engine.processes[0].kill()
        with pytest.raises(WeightSyncError, match=engine.urls[0]):
            sender.send(new.items(), "1")
        sender.close()
        engine.abort_weight_update()
        engine.begin_weight_update()
        retry = engine.weight_sync_target(0)
        assert retry != target and engine.processes[0].restarts == 1
        sender = retry.open_sender()
        sender.send(new.items(), "1")
        engine.end_weight_update("1")
        sender.close()
        assert _greedy_ids(engine) == [hf_greedy(model_with(tiny_model_dir, new), p, 10) for p in PROMPTS]
        assert _versions(engine) == {"1"}


def test_failed_reload_during_recovery_is_retried(tiny_model_dir, hf_model, tmp_path):
    """A restarted server whose reload fails is not down for good: once the folder is
    complete again it reloads it and serves the current version."""
    new = perturbed_weights(hf_model, seed=9)
    folder = weight_transport.write_safetensors_dir(new.items(), tmp_path / "v1", config_from=tiny_model_dir)
    cfg = own_engine_config(log_dir=str(tmp_path), retry_backoff_s=0.1, weight_dir=str(tmp_path))
    with SGLangEngine.from_config(cfg, str(tiny_model_dir)) as engine:
        engine.update_weights_from_disk(str(folder), "1")
        (folder / "model.safetensors").rename(tmp_path / "aside.safetensors")
        engine.processes[0].kill()
        result: list = []
        worker = threading.Thread(target=lambda: result.append(_greedy_ids(engine)))
        worker.start()
        deadline = time.monotonic() + 120
        while "recovery failed" not in engine._servers[0].last_error:
            assert time.monotonic() < deadline, engine._servers[0].last_error
            time.sleep(0.1)
        (tmp_path / "aside.safetensors").rename(folder / "model.safetensors")
        worker.join(timeout=120)
        assert result == [[hf_greedy(model_with(tiny_model_dir, new), p, 10) for p in PROMPTS]]
        assert _versions(engine) == {"1"}


def test_a_stuck_server_is_restarted(tiny_model_dir, hf_model, tmp_path):
    """A server that stops answering (SIGSTOP: its process lives) is taken out of rotation
    by the health check, its prompts retried, and it is restarted."""
    cfg = own_engine_config(log_dir=str(tmp_path), retry_backoff_s=0.1, health_check_interval_s=0.5,
                            health_check_timeout_s=2.0, unhealthy_restart_s=3.0, request_timeout_s=600)
    with SGLangEngine.from_config(cfg, str(tiny_model_dir)) as engine:
        stuck = _server_pid(engine)
        psutil.Process(stuck).send_signal(signal.SIGSTOP)
        try:
            result: list = []
            worker = threading.Thread(target=lambda: result.append(_greedy_ids(engine)))
            worker.start()
            worker.join(timeout=120)
        finally:
            if psutil.pid_exists(stuck):
                psutil.Process(stuck).send_signal(signal.SIGCONT)
        assert result == [[hf_greedy(hf_model, p, 10) for p in PROMPTS]]
        assert engine.processes[0].restarts == 1 and _server_pid(engine) != stuck
