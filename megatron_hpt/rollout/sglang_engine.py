"""SGLangEngine: the RolloutEngine over one or more SGLang-protocol servers (real SGLang
or the project's own server), launched here or attached to by URL.

The synchronous API runs an asyncio loop on a thread of its own. ``generate`` sends one
/generate request per prompt carrying its n samples, each with its own sampling seed
derived from (seed, prompt index, sample index); requests go to the least-loaded
serving server within a per-server concurrency limit. A request that fails for the
server's sake (connection lost, timeout, 5xx, aborted samples) is retried with backoff
on another server, and so are the requests of a server whose /health_generate stops
answering (checked while generate runs); each prompt's result is stored exactly once, so
a batch survives a server dying in its middle with nothing lost or duplicated. Token ids
and sizes are checked before anything is sent (an out-of-vocabulary id crashes a real
SGLang server).

Recovery: a failed server leaves the rotation; a launched one that died, or whose
/health_generate fails for ``unhealthy_restart_s`` (a stuck worker), is restarted. It
serves again only once it holds the current weight version: it reloads the last disk
update itself, or, after distributed updates, waits for the next one (included in a
new weight-update group); when no server can serve, ``generate`` raises WeightsNeeded.
A recovery that fails (e.g. a reload) is retried with backoff, never given up.

Weights: ``update_weights_from_disk`` (HF safetensors the trainer wrote), or the
distributed path (``begin_weight_update``, per pipeline stage a sender opened from
``weight_sync_target(stage)`` broadcasting size-bounded buckets of named tensors,
``end_weight_update``), each followed by /flush_cache.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import json
import logging
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import aiohttp
import torch

from megatron_hpt.rollout import protocol, weight_transport
from megatron_hpt.rollout.client import RequestObserver, RequestRefused, ServerUnavailable, SGLangClient, auth_headers
from megatron_hpt.rollout.config import RolloutConfig, is_loopback
from megatron_hpt.rollout.engine import (
    Completion,
    RolloutEngine,
    RolloutError,
    SamplingParams,
    WeightSender,
    WeightsNeeded,
    WeightSyncError,
    WeightSyncTarget,
)
from megatron_hpt.rollout.launcher import LAUNCH_VERSION, ServerProcess, launch_api_key, launch_servers, reserve_port

log = logging.getLogger(__name__)

__all__ = ["DistributedWeightSender", "HttpWeightSyncTarget", "RolloutError", "SGLangEngine", "create_rollout_engine", "sample_seed"]


def sample_seed(seed: int, prompt_index: int, sample_index: int) -> int:
    """The sampling seed of sample j of prompt i: a hash of (seed, i, j) in [0, 2**63)."""
    digest = hashlib.blake2b(f"{seed}/{prompt_index}/{sample_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def read_model_limits(model_path: str | Path) -> tuple[int, int]:
    """(vocab_size, context_length) from an HF config.json."""
    cfg_path = Path(model_path) / "config.json"
    try:
        cfg = json.loads(cfg_path.read_text())
    except OSError as e:
        raise FileNotFoundError(f"cannot read {cfg_path} for the vocabulary size: {e}") from None
    text_cfg = cfg.get("text_config", cfg)
    return int(text_cfg["vocab_size"]), int(text_cfg.get("max_position_embeddings", 1 << 30))


@dataclass
class _Server:
    client: SGLangClient
    semaphore: asyncio.Semaphore
    process: ServerProcess | None = None
    inflight: int = 0
    down: bool = False
    """Out of rotation: failed, recovering, or waiting for weights."""
    needs_weights: bool = False
    """Up, but without the current weights until the next distributed update."""
    recovering: asyncio.Task | None = None
    failures: int = 0
    incarnation: int = 0
    """Bumped by every recovery: the server may have lost its weight-update group."""
    released: bool = False
    gone: asyncio.Event = field(default_factory=asyncio.Event)
    """Set when the server leaves the rotation: its in-flight requests give up on it."""
    last_error: str = ""


@dataclass
class _Unit:
    index: int
    payload: dict
    attempts: int = 0
    errors: list[str] = field(default_factory=list)


class SGLangEngine(RolloutEngine):
    def __init__(
        self,
        cfg: RolloutConfig,
        urls: list[str],
        *,
        vocab_size: int,
        context_length: int,
        processes: list[ServerProcess] | None = None,
        observer: RequestObserver | None = None,
        api_key: str | None = None,
        weight_version: str = LAUNCH_VERSION,
    ):
        if processes is not None and len(processes) != len(urls):
            raise ValueError("one process per url")
        self.cfg = cfg
        self.vocab_size, self.context_length = vocab_size, context_length
        self.processes = processes or []
        self.observer = observer
        self.api_key = api_key
        self.weight_version = weight_version
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="rollout-client", daemon=True)
        self._thread.start()
        self._servers: list[_Server] = self._run(self._make_servers(urls, processes))
        self._last_disk_weights: dict | None = None
        """The last completed /update_weights_from_disk body: a recovered server loads it."""
        self._group_key: tuple | None = None
        self._group_epoch = 0
        self._update_members: list[_Server] = []
        self._pick_counter = 0
        self.completed_units = 0
        """Prompts answered so far (all generate calls); tests use it to act mid-batch."""

    # -- construction ------------------------------------------------------------

    @classmethod
    def from_config(cls, cfg: RolloutConfig, model_path: str | None, observer: RequestObserver | None = None) -> SGLangEngine:
        """Launches the configured servers (or attaches to ``cfg.urls``) and returns the engine."""
        if cfg.vocab_size is not None and cfg.context_length is not None:
            vocab, ctx = cfg.vocab_size, cfg.context_length
        elif model_path is not None:
            vocab, ctx = read_model_limits(model_path)
            vocab, ctx = cfg.vocab_size or vocab, cfg.context_length or ctx
        else:
            raise ValueError("attach mode without a model path needs rollout.vocab_size and rollout.context_length")
        if cfg.engine == "attach":
            key = cfg.resolve_api_key()
            remote = [u for u in cfg.urls if not is_loopback(_host_of(u))]
            if remote and key is None:
                raise ValueError(
                    f"rollout.urls {remote} are on other hosts: set rollout.api_key ('env:NAME' or 'file:PATH') "
                    "to the key those servers were started with (--api-key)"
                )
            engine = cls(cfg, list(cfg.urls), vocab_size=vocab, context_length=ctx, observer=observer, api_key=key)
            try:
                engine.weight_version = engine._attached_version()
            except BaseException:
                engine.close()
                raise
            return engine
        if model_path is None:
            raise ValueError(f"engine {cfg.engine!r} launches servers and needs the model path")
        key = launch_api_key(cfg)
        processes = launch_servers(cfg, model_path, api_key=key, weight_version=LAUNCH_VERSION)
        return cls(cfg, [p.url for p in processes], vocab_size=vocab, context_length=ctx, processes=processes,
                   observer=observer, api_key=key, weight_version=LAUNCH_VERSION)

    async def _make_servers(self, urls, processes) -> list[_Server]:
        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        out = []
        for i, url in enumerate(urls):
            client = SGLangClient(url, self._session, self.cfg.request_timeout_s, self.observer, api_key=self.api_key)
            out.append(_Server(client=client, semaphore=asyncio.Semaphore(self.cfg.concurrency), process=processes[i] if processes else None))
        return out

    def _attached_version(self) -> str:
        """The weight version every attached server reports (they must agree)."""
        async def go():
            return await asyncio.gather(*(self._reported_version(s) for s in self._servers), return_exceptions=True)

        versions = self._run(go())
        for url, v in zip(self.urls, versions):
            if isinstance(v, BaseException):
                raise RolloutError(f"cannot read the weight version of {url}: {v}")
        if len(set(versions)) != 1:
            raise RolloutError(f"the attached servers hold different weight versions: {dict(zip(self.urls, versions))}")
        return versions[0]

    def _run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    @property
    def urls(self) -> list[str]:
        return [s.client.url for s in self._servers]

    # -- generation --------------------------------------------------------------

    def check_request(self, prompts: list[list[int]], n: int, max_new_tokens: int) -> None:
        """Raises ValueError naming the size, prompt or position a server would choke on."""
        if not (isinstance(n, int) and not isinstance(n, bool)) or not 1 <= n <= self.cfg.max_n:
            raise ValueError(f"n must be an integer in [1, rollout.max_n={self.cfg.max_n}], got {n!r}")
        for i, p in enumerate(prompts):
            if not p:
                raise ValueError(f"prompt {i} is empty")
            for pos, t in enumerate(p):
                if not (isinstance(t, int) and not isinstance(t, bool)) or not 0 <= t < self.vocab_size:
                    raise ValueError(f"prompt {i} position {pos}: token id {t!r} is outside the vocabulary [0, {self.vocab_size})")
            if len(p) + max_new_tokens > self.context_length:
                raise ValueError(
                    f"prompt {i}: {len(p)} prompt tokens + max_new_tokens {max_new_tokens} exceed the context length "
                    f"{self.context_length}; shorten the prompt or lower max_new_tokens"
                )

    def generate(self, prompts: list[list[int]], n: int, params: SamplingParams, seed: int) -> list[list[Completion]]:
        self.check_request(prompts, n, params.max_new_tokens)
        base = params.to_sglang()
        units = []
        for i, p in enumerate(prompts):
            sps = [dict(base, sampling_seed=sample_seed(seed, i, j)) for j in range(n)]
            units.append(_Unit(index=i, payload=protocol.build_generate_payload([list(p)] * n, sps, return_logprob=True)))
        return self._run(self._generate(units, n))

    async def _generate(self, units: list[_Unit], n: int) -> list[list[Completion]]:
        results: dict[int, list[Completion]] = {}

        async def run(unit: _Unit) -> None:
            completions = await self._run_unit(unit, n)
            if unit.index in results:
                raise RolloutError(f"prompt {unit.index} was answered twice")
            results[unit.index] = completions
            self.completed_units += 1

        watcher = asyncio.ensure_future(self._watch_health())
        tasks = [asyncio.ensure_future(run(u)) for u in units]
        try:
            await asyncio.gather(*tasks)
        except BaseException:
            for t in tasks:
                t.cancel()
            raise
        finally:
            watcher.cancel()
        missing = [u.index for u in units if u.index not in results]
        if missing:
            raise RolloutError(f"prompts {missing[:10]} got no completions")
        return [results[u.index] for u in units]

    async def _run_unit(self, unit: _Unit, n: int) -> list[Completion]:
        while True:
            server = await self._pick_server()
            try:
                async with server.semaphore:
                    server.inflight += 1
                    try:
                        reply = await self._post_unless_gone(server, "/generate", unit.payload)
                    finally:
                        server.inflight -= 1
                completions = self._parse_reply(reply, n, server.client.url)
                server.failures = 0
                return completions
            except RequestRefused as e:
                raise RolloutError(f"prompt {unit.index}: {e}") from e
            except ServerUnavailable as e:
                unit.attempts += 1
                unit.errors.append(str(e))
                self._mark_failed(server, str(e))
                if unit.attempts > self.cfg.max_retries:
                    raise RolloutError(f"prompt {unit.index} failed {unit.attempts} times: " + " | ".join(unit.errors[-3:])) from e
                await asyncio.sleep(self.cfg.retry_backoff_s * 2 ** (unit.attempts - 1))

    async def _post_unless_gone(self, server: _Server, path: str, body: Any) -> Any:
        """The reply of ``path``; ServerUnavailable as soon as the server leaves the rotation."""
        if server.gone.is_set():
            raise ServerUnavailable(f"{server.client.url} is out of rotation")
        post = asyncio.ensure_future(server.client.post(path, body))
        gone = asyncio.ensure_future(server.gone.wait())
        try:
            await asyncio.wait({post, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if not post.done():
            post.cancel()
            raise ServerUnavailable(f"{server.client.url} was taken out of rotation ({server.last_error})")
        return post.result()

    @staticmethod
    def _parse_reply(reply: Any, n: int, url: str) -> list[Completion]:
        items = reply if isinstance(reply, list) else [reply]
        if len(items) != n:
            raise ServerUnavailable(f"{url} returned {len(items)} completions for {n} samples")
        completions = []
        for item in items:
            try:
                c = protocol.completion_from_reply(item)
            except ValueError as e:
                raise ServerUnavailable(f"{url}: malformed reply: {e}") from e
            if c.finish_reason == "abort":
                raise ServerUnavailable(f"{url} aborted a sample: {c.meta.get('finish_reason')}")
            c.meta["server"] = url
            completions.append(c)
        return completions

    async def _pick_server(self) -> _Server:
        deadline = time.monotonic() + self.cfg.startup_timeout_s + self.cfg.request_timeout_s
        while True:
            live = [s for s in self._servers if not s.down]
            if live:
                self._pick_counter += 1
                # Least loaded first; the rotating offset spreads ties (round-robin).
                k = self._pick_counter % len(live)
                rotated = live[k:] + live[:k]
                return min(rotated, key=lambda s: s.inflight / self.cfg.concurrency)
            if not any(s.recovering is not None for s in self._servers):
                waiting = [s.client.url for s in self._servers if s.needs_weights]
                if waiting:
                    raise WeightsNeeded(
                        f"no rollout server holds weight version {self.weight_version!r}: {', '.join(waiting)} were "
                        "restarted and wait for a distributed weight update"
                    )
                raise RolloutError("no rollout server is up and none is being restarted: " + ", ".join(self._describe()))
            if time.monotonic() > deadline:
                raise RolloutError("no rollout server is up: " + ", ".join(self._describe()))
            await asyncio.sleep(0.1)

    def _describe(self) -> list[str]:
        return [f"{s.client.url} ({s.last_error or 'down'})" for s in self._servers]

    async def _watch_health(self) -> None:
        """While generating: a server whose /health_generate does not answer 200 in time
        (a stuck worker answers nothing) leaves the rotation and is recovered."""
        while True:
            await asyncio.sleep(self.cfg.health_check_interval_s)
            live = [s for s in self._servers if not s.down]
            codes = await asyncio.gather(
                *(s.client.status("/health_generate", timeout_s=self.cfg.health_check_timeout_s) for s in live))
            for s, code in zip(live, codes):
                if code != 200 and not s.down:
                    self._mark_failed(s, f"/health_generate answered {code or 'nothing'}")

    # -- recovery ------------------------------------------------------------------

    def _mark_failed(self, server: _Server, reason: str = "") -> None:
        server.failures += 1
        if server.down:
            return
        server.down = True
        server.last_error = reason
        server.gone.set()
        server.recovering = asyncio.ensure_future(self._recover(server))

    def _serve(self, server: _Server) -> None:
        server.needs_weights = False
        server.gone = asyncio.Event()
        server.last_error = ""
        server.down = False

    async def _recover(self, server: _Server) -> None:
        """Brings a failed server back (see the module docstring); retried with backoff
        until it serves, waits for weights, or (restarts disabled) stays down."""
        wait = self.cfg.retry_backoff_s
        try:
            while True:
                try:
                    await self._bring_back(server)
                    return
                except asyncio.CancelledError:
                    raise
                except Exception as e:  # noqa: BLE001 - any failure is retried; the reason is kept
                    server.last_error = f"recovery failed: {type(e).__name__}: {e}"
                    log.warning("%s: %s; retrying in %.1f s", server.client.url, server.last_error, wait)
                    await asyncio.sleep(wait)
                    wait = min(2 * wait, 30.0)
        finally:
            server.recovering = None

    async def _bring_back(self, server: _Server) -> None:
        proc = server.process
        if proc is not None:
            healthy = proc.alive() and await self._wait_healthy(server, self.cfg.unhealthy_restart_s)
            if not healthy:
                if not self.cfg.restart_dead_servers:
                    server.last_error += " (restarts are disabled: rollout.restart_dead_servers)"
                    return
                await asyncio.to_thread(proc.restart, self.cfg.startup_timeout_s)
                server.client.url = proc.url
                server.released = False
        else:
            await self._wait_healthy(server, None)
        server.incarnation += 1
        await self._bring_to_current_version(server)

    async def _wait_healthy(self, server: _Server, limit_s: float | None) -> bool:
        """Until /health_generate answers 200 (True), or ``limit_s`` passes or a launched
        process dies (False)."""
        deadline = None if limit_s is None else time.monotonic() + limit_s
        while await server.client.status("/health_generate", timeout_s=self.cfg.health_check_timeout_s) != 200:
            if server.process is not None and not server.process.alive():
                return False
            if deadline is not None and time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.5)
        return True

    async def _reported_version(self, server: _Server) -> str:
        info = await server.client.get("/model_info")
        if not isinstance(info, dict) or not isinstance(info.get("weight_version"), str):
            raise RolloutError(f"{server.client.url}/model_info has no weight_version: {str(info)[:200]}")
        return info["weight_version"]

    async def _bring_to_current_version(self, server: _Server) -> None:
        """Serve once the server holds ``self.weight_version``: as it is, by reloading the
        last disk update, or (distributed sync) after the next update includes it."""
        for _ in range(3):  # an update may complete meanwhile: then reload the newer one
            current = self.weight_version
            reported = await self._reported_version(server)
            if reported == current:
                self._serve(server)
                return
            disk = self._last_disk_weights
            if disk is None or disk["weight_version"] != current:
                server.needs_weights = True
                server.last_error = f"waits for weight version {current!r} (distributed update)"
                return
            reply = await server.client.post("/update_weights_from_disk", disk)
            if not (isinstance(reply, dict) and reply.get("success")):
                raise RolloutError(f"{server.client.url} did not reload {disk['model_path']}: {reply}")
            await server.client.post("/flush_cache")
        raise RolloutError(f"{server.client.url} reports weight version {reported!r} after reloading {current!r}")

    # -- weights -------------------------------------------------------------------

    def update_weights_from_disk(self, path: str, version: str) -> None:
        """Every serving server loads ``path``. A server that is down (or dies now) is not
        an error: it loads these weights before it serves again."""
        body = {"model_path": str(path), "weight_version": str(version), "flush_cache": True}

        async def go():
            async def one(server: _Server):
                if server.down:
                    return None
                try:
                    return await server.client.post("/update_weights_from_disk", body)
                except ServerUnavailable as e:
                    self._mark_failed(server, str(e))
                    return None

            replies = await asyncio.gather(*(one(s) for s in self._servers))
            failed = [(s.client.url, r) for s, r in zip(self._servers, replies)
                      if r is not None and not (isinstance(r, dict) and r.get("success"))]
            if failed:
                return replies, failed
            self._last_disk_weights = body
            self.weight_version = str(version)
            for s in self._servers:  # waiting for weights that a reload can now give
                if s.needs_weights and s.recovering is None:
                    s.recovering = asyncio.ensure_future(self._recover(s))
            if all(r is None for r in replies):
                # Nobody loaded them: wait for the restarts, which load these weights.
                restarts = [s.recovering for s in self._servers if s.recovering is not None]
                if restarts:
                    await asyncio.wait(restarts, timeout=self.cfg.startup_timeout_s)
            return replies, []

        try:
            replies, failed = self._run(go())
        except RequestRefused as e:
            raise WeightSyncError(str(e)) from e
        for url, r in failed:
            raise WeightSyncError(f"{url} did not load {path}: {r}")
        if all(s.down for s in self._servers):
            raise WeightSyncError(f"no rollout server is up to load {path}: " + ", ".join(self._describe()))
        for server, r in zip(self._servers, replies):
            if r is not None:
                self._run(server.client.post("/flush_cache"))

    def _post_each(self, servers: list[_Server], path: str, body: Any = None) -> list[_Server]:
        """POST to each server; those that are unreachable are marked failed (recovery
        takes over) and left out of the returned list; any other failure raises
        WeightSyncError naming the server."""
        async def go():
            replies = await asyncio.gather(*(s.client.post(path, body) for s in servers), return_exceptions=True)
            ok = []
            for s, r in zip(servers, replies):
                if isinstance(r, ServerUnavailable):
                    self._mark_failed(s, str(r))
                elif isinstance(r, BaseException):
                    raise WeightSyncError(f"{s.client.url}{path} failed: {r}") from r
                elif isinstance(r, dict) and r.get("success") is False:
                    raise WeightSyncError(f"{s.client.url}{path} failed: {r.get('message', r)}")
                else:
                    ok.append(s)
            return ok

        return self._run(go())

    def begin_weight_update(self) -> None:
        """Opens the update on every server that is up (serving or waiting for weights;
        SGLang 0.5.23 wants a session around /update_weights_from_distributed). Servers
        being restarted are waited for, so the update includes them. When that set
        changed since the last update (a restart), the targets name a new group."""
        for _ in range(self.cfg.max_retries + 1):
            self._run(self._await_restarts())
            members = [s for s in self._servers if not s.down or s.needs_weights]
            if not members:
                break
            opened = self._post_each(members, "/begin_weight_update")
            if len(opened) == len(members):
                key = tuple((id(s), s.incarnation, s.client.url) for s in members)
                if key != self._group_key:
                    self._group_key, self._group_epoch = key, self._group_epoch + 1
                self._update_members = members
                return
            self._post_each(opened, "/end_weight_update")  # a server died: start again without it
        raise WeightSyncError("no rollout server is up for the weight update: " + ", ".join(self._describe()))

    async def _await_restarts(self) -> None:
        """Wait (up to the startup timeout) for servers being restarted."""
        deadline = time.monotonic() + self.cfg.startup_timeout_s
        while time.monotonic() < deadline and any(s.recovering is not None and not s.needs_weights for s in self._servers):
            await asyncio.sleep(0.1)

    def end_weight_update(self, version: str) -> None:
        members = self._post_each(self._update_members, "/end_weight_update")
        members = self._post_each(members, "/flush_cache")
        self.weight_version = str(version)
        self._update_members = []

        async def serve_waiting():
            for s in members:
                if s.needs_weights:
                    self._serve(s)

        self._run(serve_waiting())

    def abort_weight_update(self) -> None:
        """A stage could not send (a server died mid-update): close the sessions, recover
        the servers that stopped answering; the next update forms a new group."""
        members, self._update_members = self._update_members, []
        self._group_key = None

        async def go():
            codes = await asyncio.gather(*(s.client.status("/health_generate", timeout_s=self.cfg.health_check_timeout_s)
                                           for s in members))
            for s, code in zip(members, codes):
                if code != 200:
                    self._mark_failed(s, f"lost during a weight update (/health_generate: {code or 'no answer'})")
            return [s for s, code in zip(members, codes) if code == 200]

        alive = self._run(go())
        try:
            self._post_each(alive, "/end_weight_update")
        except WeightSyncError:
            pass  # a session the server already closed

    def weight_sync_target(self, stage: int = 0) -> HttpWeightSyncTarget:
        """What the trainer rank of pipeline stage ``stage`` needs to send its weights to
        the servers of the current update (picklable)."""
        if not self._update_members:
            raise RuntimeError("call begin_weight_update() before weight_sync_target()")
        backend = self.cfg.weight_sync_backend
        if backend == "auto":
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        tp = self.cfg.tp_size if self.cfg.engine == "sglang" else 1
        return HttpWeightSyncTarget(
            urls=tuple(s.client.url for s in self._update_members),
            server_tp_sizes=tuple(tp for _ in self._update_members),
            group_name=f"megatron_hpt_stage{stage}_g{self._group_epoch}",
            backend=backend,
            master_address=self.cfg.weight_sync_master_address,
            bucket_bytes=self.cfg.weight_bucket_mb << 20,
            timeout_s=self.cfg.request_timeout_s,
            api_key=self.api_key,
        )

    # -- memory, health, close -----------------------------------------------------

    def release_memory(self) -> None:
        for s in self._post_each([s for s in self._servers if not s.down], "/release_memory_occupation"):
            s.released = True

    def resume_memory(self) -> None:
        released = [s for s in self._servers if s.released]
        self._post_each(released, "/resume_memory_occupation")
        for s in released:  # a server restarted meanwhile holds its memory anyway
            s.released = False

    def healthy(self) -> bool:
        async def go():
            return await asyncio.gather(*(s.client.status("/health_generate") for s in self._servers))

        return all(code == 200 for code in self._run(go()))

    def close(self) -> None:
        super().close()
        if self._thread.is_alive():
            async def shutdown():
                for s in self._servers:
                    if s.recovering is not None:
                        s.recovering.cancel()
                await self._session.close()

            self._run(shutdown())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
        for p in self.processes:
            p.stop()


def _host_of(url: str) -> str:
    from urllib.parse import urlsplit

    return urlsplit(url).hostname or ""


@dataclass(frozen=True)
class HttpWeightSyncTarget(WeightSyncTarget):
    """Where and how one pipeline stage broadcasts its weights (picklable)."""

    urls: tuple[str, ...]
    server_tp_sizes: tuple[int, ...]
    """Ranks each server joins the group with (its TP size); rank 0 is the trainer."""
    group_name: str
    backend: str
    master_address: str
    bucket_bytes: int
    timeout_s: float = 600.0
    api_key: str | None = field(default=None, repr=False)

    def open_sender(self) -> DistributedWeightSender:
        sender = DistributedWeightSender(self)
        sender.open()
        return sender


class DistributedWeightSender(WeightSender):
    """Rank 0 of a weight-update group with every server: broadcasts HF-named tensors in
    size-bounded buckets (SGLang's flattened_bucket layout), announcing each bucket on
    /update_weights_from_distributed while it is being broadcast."""

    def __init__(self, target: HttpWeightSyncTarget):
        self.target = target
        self.group = None
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(2, len(target.urls)))
        self.bytes_sent = 0

    def _post(self, url: str, path: str, body: dict) -> dict:
        headers = {"content-type": "application/json", **auth_headers(self.target.api_key)}
        req = urllib.request.Request(url + path, data=json.dumps(body).encode(), headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=self.target.timeout_s) as r:
                return json.loads(r.read() or b"null")
        except urllib.error.HTTPError as e:
            raise WeightSyncError(f"{url}{path} answered {e.code}: {e.read()[:500].decode(errors='replace')}") from None
        except (urllib.error.URLError, OSError) as e:
            raise WeightSyncError(f"{url}{path}: {e}") from None

    def _post_all(self, path: str, bodies: list[dict]) -> list[tuple[str, concurrent.futures.Future]]:
        return [(url, self._pool.submit(self._post, url, path, body)) for url, body in zip(self.target.urls, bodies)]

    @staticmethod
    def _check(futures: list[tuple[str, concurrent.futures.Future]], what: str) -> None:
        for url, f in futures:
            reply = f.result()
            if not (isinstance(reply, dict) and reply.get("success")):
                raise WeightSyncError(f"{url}: {what} failed: {reply}")

    def open(self) -> None:
        t = self.target
        reservation = reserve_port(t.master_address)  # held until the rendezvous store binds it
        world = 1 + sum(t.server_tp_sizes)
        offsets = [1 + sum(t.server_tp_sizes[:i]) for i in range(len(t.urls))]
        bodies = [
            {"master_address": t.master_address, "master_port": reservation.port, "rank_offset": off, "world_size": world,
             "group_name": t.group_name, "backend": t.backend}
            for off in offsets
        ]
        futures = self._post_all("/init_weights_update_group", bodies)
        try:
            self.group = weight_transport.open_update_group(
                master_address=t.master_address, master_port=reservation.port, rank=0, world_size=world,
                group_name=t.group_name, backend=t.backend, timeout_s=t.timeout_s,
            )
        except Exception as e:
            raise WeightSyncError(f"the weight-update group with {', '.join(t.urls)} did not form: {e}") from e
        finally:
            reservation.release()
        self._check(futures, "init_weights_update_group")

    def send(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: str | None = None) -> None:
        if self.group is None:
            raise RuntimeError("call open() before send()")
        import torch.distributed as dist

        device = torch.device("cuda", torch.cuda.current_device()) if self.target.backend == "nccl" else torch.device("cpu")
        for bucket in weight_transport.bucket_by_size(named_tensors, self.target.bucket_bytes):
            body = {
                "names": [n for n, _ in bucket],
                "dtypes": [weight_transport.dtype_name(t.dtype) for _, t in bucket],
                "shapes": [list(t.shape) for _, t in bucket],
                "group_name": self.target.group_name,
                "load_format": "flattened_bucket",
                "flush_cache": False,
            }
            if version is not None:
                body["weight_version"] = str(version)
            futures = self._post_all("/update_weights_from_distributed", [body] * len(self.target.urls))
            flat = weight_transport.flatten_bucket([t.detach().to(device) for _, t in bucket])
            try:
                dist.broadcast(flat, src=0, group=self.group)
            except RuntimeError as e:
                raise WeightSyncError(
                    f"broadcasting {len(bucket)} tensors ({bucket[0][0]}, ...) to {', '.join(self.target.urls)} failed: {e}"
                ) from e
            self._check(futures, f"update_weights_from_distributed ({len(bucket)} tensors)")
            self.bytes_sent += flat.numel()

    def close(self) -> None:
        if self.group is not None:
            futures = self._post_all("/destroy_weights_update_group", [{"group_name": self.target.group_name}] * len(self.target.urls))
            for _, f in futures:
                try:
                    f.result()
                except WeightSyncError:
                    pass  # a server that died or restarted has no group left to destroy
            weight_transport.close_update_group(self.group)
            self.group = None
        self._pool.shutdown(wait=False)


def create_rollout_engine(cfg: RolloutConfig, model_path: str | None, observer: RequestObserver | None = None) -> SGLangEngine:
    """The rollout engine the config asks for (launching its servers when needed)."""
    return SGLangEngine.from_config(cfg, model_path, observer=observer)
