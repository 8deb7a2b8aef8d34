"""Launching rollout servers: a launch is ready only when its own server answers (a
foreign server on the port is refused), ports are held until the server binds, API keys
are required and sent, and the exact commands and environments each server gets on a
GPU node (placement, memory fraction, colocation)."""

from __future__ import annotations

import asyncio
import os
import re
import socket
import sys
import threading

import pytest
from aiohttp import web

from megatron_hpt.rollout import RolloutConfig, RolloutError, SamplingParams, SGLangEngine
from megatron_hpt.rollout.launcher import (
    ForeignServer,
    LaunchSpec,
    ServerProcess,
    http_get,
    launch_api_key,
    own_server_command,
    reserve_port,
    server_gpus,
    sglang_server_command,
)
from rollout_testlib import get, own_engine_config


class StubServer:
    """Something else listening on a port: answers /health_generate 200 and
    /server_info with the given status and body."""

    def __init__(self, port: int, status: int, info: dict):
        self.loop = asyncio.new_event_loop()
        app = web.Application()
        app.router.add_get("/health_generate", lambda r: web.Response(status=200))
        app.router.add_get("/server_info", lambda r: web.json_response(info, status=status))
        self.runner = web.AppRunner(app)
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        self._run(self.runner.setup())
        self._run(web.TCPSite(self.runner, "127.0.0.1", port, reuse_address=True).start())

    def _run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=30)

    def stop(self) -> None:
        self._run(self.runner.cleanup())
        self.loop.call_soon_threadsafe(self.loop.stop)


@pytest.mark.parametrize("status, info, why", [
    (200, {"launch_token": "another-run"}, "its launch token is 'another-run', not this launch's"),
    (401, {"error": "Unauthorized"}, "it refused our API key (401)"),
])
def test_a_foreign_server_on_the_port_is_refused(tmp_path, status, info, why):
    """Another server takes the port between the launch and the bind of ours (ours never
    binds here): readiness must not take it for ours."""
    stubs = []

    def build(spec: LaunchSpec):
        stubs.append(StubServer(spec.port, status, info))
        return [sys.executable, "-c", "import time; time.sleep(60)"], dict(os.environ)

    proc = ServerProcess(build, host="127.0.0.1", log_path=tmp_path / "server.log", name="own server 0")
    proc.start()
    try:
        with pytest.raises(ForeignServer, match=re.escape(f"another server answers at {proc.url}, not the one launched here ({why})")):
            proc.wait_ready(timeout_s=60)
        assert not proc.alive()
    finally:
        proc.stop()
        for s in stubs:
            s.stop()


def test_a_port_is_held_until_the_server_binds_it():
    held = reserve_port("127.0.0.1")
    try:
        with socket.socket() as other, pytest.raises(OSError):
            other.bind(("127.0.0.1", held.port))  # nobody else gets it ...
        with socket.socket() as server:  # ... but the server we start binds and listens on it
            server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            server.bind(("127.0.0.1", held.port))
            server.listen()
        again = reserve_port("127.0.0.1", preferred=held.port)
        assert again.port != held.port  # a held port is not handed out twice
        again.release()
    finally:
        held.release()


def test_api_key_is_required_and_sent(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HPT_TEST_ROLLOUT_KEY", "s3cret-key")
    cfg = own_engine_config(api_key="env:HPT_TEST_ROLLOUT_KEY", log_dir=str(tmp_path))
    with SGLangEngine.from_config(cfg, str(tiny_model_dir)) as engine:
        url = engine.urls[0]
        assert get(url, "/get_server_info")[0] == 401
        assert get(url, "/get_model_info")[0] == 401
        status, info = http_get(url + "/get_server_info", {"Authorization": "Bearer s3cret-key"})
        assert status == 200 and info["launch_token"] == engine.processes[0].spec.launch_token
        out = engine.generate([[1, 2, 3]], 2, SamplingParams(temperature=0.0, max_new_tokens=4), seed=0)
        assert [len(c.output_ids) for c in out[0]] == [4, 4]
        assert "s3cret-key" not in (tmp_path / "server-0.log").read_text()
        monkeypatch.setenv("HPT_TEST_ROLLOUT_KEY", "wrong-key")
        attach = RolloutConfig(engine="attach", urls=(url,), api_key="env:HPT_TEST_ROLLOUT_KEY")
        with pytest.raises(RolloutError, match=r"\(401\) \(the server wants another API key: check rollout.api_key\)"):
            SGLangEngine.from_config(attach, str(tiny_model_dir))


def test_api_key_settings(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="rollout.api_key must name where the key is read from, 'env:NAME' or 'file:PATH'"):
        RolloutConfig(api_key="s3cret")
    key_file = tmp_path / "key"
    key_file.write_text("from-a-file\n")
    assert RolloutConfig(api_key=f"file:{key_file}").resolve_api_key() == "from-a-file"
    monkeypatch.delenv("HPT_UNSET_KEY", raising=False)
    with pytest.raises(ValueError, match="the environment variable HPT_UNSET_KEY is unset or empty"):
        RolloutConfig(api_key="env:HPT_UNSET_KEY").resolve_api_key()
    with pytest.raises(ValueError, match="cannot read the key file"):
        RolloutConfig(api_key=f"file:{tmp_path / 'missing'}").resolve_api_key()
    # servers on loopback need none; beyond it a random key per launch
    assert launch_api_key(RolloutConfig()) is None
    keys = {launch_api_key(RolloutConfig(host="0.0.0.0")) for _ in range(2)}
    assert len(keys) == 2 and all(k and len(k) >= 32 for k in keys)
    # attaching to servers on other hosts without a key is refused
    with pytest.raises(ValueError, match=r"rollout.urls \['http://10.1.2.3:30000'\] are on other hosts: set rollout.api_key"):
        SGLangEngine.from_config(RolloutConfig(engine="attach", urls=("http://10.1.2.3:30000",), vocab_size=10,
                                               context_length=10), None)


GPUS = [str(i) for i in range(8)]


def test_colocated_sglang_servers_each_get_their_own_gpus():
    """The 7B recipe's layout: 4 SGLang servers of TP 2 on one 8-GPU node beside the trainer."""
    cfg = RolloutConfig(engine="sglang", num_servers=4, tp_size=2, dtype="bfloat16", device="cuda",
                        colocated=True, mem_fraction_static=0.4, sglang_deterministic=False)
    for i in range(4):
        spec = LaunchSpec(port=30000 + i, launch_token="tok", api_key="k3y", weight_version="launch",
                          gpus=server_gpus(cfg, i, GPUS))
        cmd, env = sglang_server_command(cfg, "/ckpt/m", spec, python="/opt/sglang/bin/python", gpu=True)
        assert env["CUDA_VISIBLE_DEVICES"] == f"{2 * i},{2 * i + 1}"
        assert cmd == [
            "/opt/sglang/bin/python", "-m", "sglang.launch_server", "--model-path", "/ckpt/m", "--host", "127.0.0.1",
            "--port", str(30000 + i), "--tp-size", "2", "--dp-size", "1", "--dtype", "bfloat16",
            "--served-model-name", "tok", "--weight-version", "launch", "--api-key", "k3y",
            "--base-gpu-id", "0", "--mem-fraction-static", "0.4", "--enable-memory-saver",
        ]


def test_placement_counts_in_the_gpus_the_trainer_sees():
    # The trainer sees GPUs 4-7 (its CUDA_VISIBLE_DEVICES); servers start at the third of them.
    cfg = RolloutConfig(engine="sglang", num_servers=2, device="cuda", base_gpu_id=2)
    assert [server_gpus(cfg, i, ["4", "5", "6", "7"]) for i in range(2)] == [("6",), ("7",)]
    cfg = RolloutConfig(engine="sglang", num_servers=3, tp_size=2, device="cuda", base_gpu_id=4)
    with pytest.raises(ValueError, match=r"3 servers x 2 GPUs from rollout.base_gpu_id=4 need 10 GPUs, but 8 are visible"):
        server_gpus(cfg, 0, GPUS)
    own = RolloutConfig(engine="own", num_servers=2, device="cuda", base_gpu_id=6)
    spec = LaunchSpec(port=1, launch_token="t", api_key=None, weight_version="launch", gpus=server_gpus(own, 1, GPUS))
    cmd, env = own_server_command(own, "/ckpt/m", spec)
    assert env["CUDA_VISIBLE_DEVICES"] == "7" and cmd[cmd.index("--device") + 1] == "cuda"
    assert cmd[cmd.index("--launch-token") + 1] == "t" and cmd[cmd.index("--weight-version") + 1] == "launch"
    # on CPU nothing is placed
    spec = LaunchSpec(port=1, launch_token="t", api_key=None, weight_version="launch")
    cmd, env = own_server_command(RolloutConfig(device="cpu"), "/ckpt/m", spec)
    assert env.get("CUDA_VISIBLE_DEVICES") == os.environ.get("CUDA_VISIBLE_DEVICES") and "--api-key" not in cmd


def test_colocation_settings_are_checked():
    with pytest.raises(ValueError, match="rollout.colocated with engine 'sglang' needs rollout.mem_fraction_static"):
        RolloutConfig(engine="sglang", colocated=True)
    with pytest.raises(ValueError, match=r"rollout.mem_fraction_static must be in \(0, 1\), got 1.5"):
        RolloutConfig(mem_fraction_static=1.5)
    with pytest.raises(ValueError, match="rollout.base_gpu_id must be >= 0, got -1"):
        RolloutConfig(base_gpu_id=-1)


def test_the_7b_recipe_runs_its_servers_colocated():
    from megatron_hpt.trainer.config import load_run_config

    cfg = load_run_config("hpt-qwen2.5-math-7b-8gpu").rollout
    assert cfg.colocated and cfg.engine == "sglang" and cfg.mem_fraction_static is not None
    placed = [server_gpus(cfg, i, GPUS) for i in range(cfg.num_servers)]
    assert sorted(g for gpus in placed for g in gpus) == GPUS  # every GPU once: one server per TP pair
