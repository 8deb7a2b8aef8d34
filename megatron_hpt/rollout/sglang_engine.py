"""SGLangEngine: the RolloutEngine over one or more SGLang-protocol servers (real SGLang
or the project's own server), launched here or attached to by URL.

The synchronous API runs an asyncio loop on a thread of its own. ``generate`` sends one
/generate request per prompt carrying its n samples, each with its own sampling seed
derived from (seed, prompt index, sample index); requests go to the least-loaded live
server within a per-server concurrency limit. A request that fails for the server's
sake (connection lost, timeout, 5xx, aborted samples) is retried with backoff on
another server, while a dead launched server is restarted in the background; each
prompt's result is stored exactly once, so a batch survives a server dying in its
middle with nothing lost or duplicated. Token ids are checked against the vocabulary
and the context length before anything is sent (an out-of-vocabulary id crashes a
real SGLang server).

Weights: ``update_weights_from_disk`` (HF safetensors the trainer wrote), or the
distributed path (``begin_weight_update``, per pipeline stage a
``DistributedWeightSender`` broadcasting size-bounded buckets of named tensors,
``end_weight_update``), each followed by /flush_cache.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import json
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
from megatron_hpt.rollout.client import RequestObserver, RequestRefused, ServerUnavailable, SGLangClient
from megatron_hpt.rollout.config import RolloutConfig
from megatron_hpt.rollout.engine import Completion, RolloutEngine, SamplingParams
from megatron_hpt.rollout.launcher import ServerProcess, free_port, launch_servers


class RolloutError(RuntimeError):
    """A rollout or weight update could not be completed; the message says which server and why."""


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
    recovering: asyncio.Task | None = None
    failures: int = 0


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
    ):
        if processes is not None and len(processes) != len(urls):
            raise ValueError("one process per url")
        self.cfg = cfg
        self.vocab_size, self.context_length = vocab_size, context_length
        self.processes = processes or []
        self.observer = observer
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="rollout-client", daemon=True)
        self._thread.start()
        self._servers: list[_Server] = self._run(self._make_servers(urls, processes))
        self._senders: dict[str, DistributedWeightSender] = {}
        self._pick_counter = 0
        self._last_disk_weights: dict | None = None
        """The last /update_weights_from_disk body: a restarted server gets it again."""
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
            return cls(cfg, list(cfg.urls), vocab_size=vocab, context_length=ctx, observer=observer)
        if model_path is None:
            raise ValueError(f"engine {cfg.engine!r} launches servers and needs the model path")
        processes = launch_servers(cfg, model_path)
        return cls(cfg, [p.url for p in processes], vocab_size=vocab, context_length=ctx, processes=processes, observer=observer)

    async def _make_servers(self, urls, processes) -> list[_Server]:
        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        out = []
        for i, url in enumerate(urls):
            client = SGLangClient(url, self._session, self.cfg.request_timeout_s, self.observer)
            out.append(_Server(client=client, semaphore=asyncio.Semaphore(self.cfg.concurrency), process=processes[i] if processes else None))
        return out

    def _run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    @property
    def urls(self) -> list[str]:
        return [s.client.url for s in self._servers]

    # -- generation --------------------------------------------------------------

    def check_prompts(self, prompts: list[list[int]], max_new_tokens: int) -> None:
        """Raises ValueError naming the prompt and position of any id a server would choke on."""
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
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        self.check_prompts(prompts, params.max_new_tokens)
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

        tasks = [asyncio.ensure_future(run(u)) for u in units]
        try:
            await asyncio.gather(*tasks)
        except BaseException:
            for t in tasks:
                t.cancel()
            raise
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
                        reply = await server.client.post("/generate", unit.payload)
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
                self._mark_failed(server)
                if unit.attempts > self.cfg.max_retries:
                    raise RolloutError(f"prompt {unit.index} failed {unit.attempts} times: " + " | ".join(unit.errors[-3:])) from e
                await asyncio.sleep(self.cfg.retry_backoff_s * 2 ** (unit.attempts - 1))

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
            if time.monotonic() > deadline:
                raise RolloutError("no rollout server is up: " + ", ".join(self.urls))
            await asyncio.sleep(0.1)

    def _mark_failed(self, server: _Server) -> None:
        server.failures += 1
        if server.down:
            return
        server.down = True
        server.recovering = asyncio.ensure_future(self._recover(server))

    async def _recover(self, server: _Server) -> None:
        """Brings a failed server back: restart it when it is ours and dead, else wait
        until it answers /health_generate again; then it loads the last weights the
        trainer pushed (a restarted server boots with its launch weights, and one that
        failed during an update may have missed it), so it never serves a stale policy."""
        try:
            proc = server.process
            if proc is not None and not proc.alive():
                if not self.cfg.restart_dead_servers:
                    return  # stays down; the other servers take its prompts
                await asyncio.to_thread(proc.restart, self.cfg.startup_timeout_s)
            else:
                while await server.client.status("/health_generate") != 200:
                    if proc is not None and not proc.alive():
                        return await self._recover(server)
                    await asyncio.sleep(0.5)
            if self._last_disk_weights is not None:
                reply = await server.client.post("/update_weights_from_disk", self._last_disk_weights)
                if not (isinstance(reply, dict) and reply.get("success")):
                    raise RolloutError(f"{server.client.url} came back but did not reload the weights: {reply}")
            server.down = False
        finally:
            server.recovering = None

    # -- control routes on every server -------------------------------------------

    def _all(self, path: str, body: Any = None, timeout_s: float | None = None) -> list[Any]:
        async def go():
            return await asyncio.gather(*(s.client.post(path, body, timeout_s) for s in self._servers))

        try:
            return self._run(go())
        except (RequestRefused, ServerUnavailable) as e:
            raise RolloutError(str(e)) from e

    def update_weights_from_disk(self, path: str, version: str) -> None:
        """Every server loads ``path``. A server that is down (or dies now) is not an
        error: it is restarted and loads these weights before it serves again."""
        body = {"model_path": str(path), "weight_version": str(version), "flush_cache": True}
        self._last_disk_weights = body

        async def go():
            async def one(server: _Server):
                if server.down:
                    return None
                try:
                    return await server.client.post("/update_weights_from_disk", body)
                except ServerUnavailable:
                    self._mark_failed(server)
                    return None

            replies = await asyncio.gather(*(one(s) for s in self._servers))
            if all(r is None for r in replies):
                # Nobody loaded them: wait for the restarts, which load these weights.
                await asyncio.gather(*(s.recovering for s in self._servers if s.recovering is not None),
                                     return_exceptions=True)
            return replies

        try:
            replies = self._run(go())
        except RequestRefused as e:
            raise RolloutError(str(e)) from e
        for url, r in zip(self.urls, replies):
            if r is not None and not (isinstance(r, dict) and r.get("success")):
                raise RolloutError(f"{url} did not load {path}: {r}")
        if all(s.down for s in self._servers):
            raise RolloutError(f"no rollout server is up to load {path} (none could be restarted): " + ", ".join(self.urls))
        for server, r in zip(self._servers, replies):
            if r is not None:
                self._run(server.client.post("/flush_cache"))

    def begin_weight_update(self) -> None:
        """Opens the servers' weight-update session (SGLang 0.5.23 requires one around
        /update_weights_from_distributed)."""
        self._all("/begin_weight_update")

    def end_weight_update(self) -> None:
        self._all("/end_weight_update")
        self._all("/flush_cache")

    def weight_sync_target(self, stage: int = 0) -> WeightSyncTarget:
        """What the trainer rank of pipeline stage ``stage`` needs to send its weights
        (picklable: build a DistributedWeightSender from it on that rank)."""
        backend = self.cfg.weight_sync_backend
        if backend == "auto":
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        tp = self.cfg.tp_size if self.cfg.engine == "sglang" else 1
        return WeightSyncTarget(
            urls=tuple(self.urls),
            server_tp_sizes=tuple(tp for _ in self.urls),
            group_name=f"megatron_hpt_stage{stage}",
            backend=backend,
            master_address=self.cfg.weight_sync_master_address,
            bucket_bytes=self.cfg.weight_bucket_mb << 20,
            timeout_s=self.cfg.request_timeout_s,
        )

    def update_weights_from_distributed(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: str) -> None:
        """Single-process form (no pipeline stages elsewhere): begin, broadcast every
        tensor from this process, end. The group stays open for the next call."""
        sender = self._senders.get("stage0")
        if sender is None:
            sender = DistributedWeightSender(self.weight_sync_target(0))
            sender.open()
            self._senders["stage0"] = sender
        self.begin_weight_update()
        try:
            sender.send(named_tensors, version)
        finally:
            self.end_weight_update()

    def close_weight_sync(self) -> None:
        """Destroys the weight-update groups this process opened (both ends)."""
        for sender in self._senders.values():
            sender.close()
        self._senders.clear()

    def release_memory(self) -> None:
        self._all("/release_memory_occupation")

    def resume_memory(self) -> None:
        self._all("/resume_memory_occupation")

    def healthy(self) -> bool:
        async def go():
            return await asyncio.gather(*(s.client.status("/health_generate") for s in self._servers))

        return all(code == 200 for code in self._run(go()))

    def close(self) -> None:
        self.close_weight_sync()
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


@dataclass(frozen=True)
class WeightSyncTarget:
    """Where and how one pipeline stage broadcasts its weights (picklable)."""

    urls: tuple[str, ...]
    server_tp_sizes: tuple[int, ...]
    """Ranks each server joins the group with (its TP size); rank 0 is the trainer."""
    group_name: str
    backend: str
    master_address: str
    bucket_bytes: int
    timeout_s: float = 600.0


class DistributedWeightSender:
    """Rank 0 of a weight-update group with every server: broadcasts HF-named tensors in
    size-bounded buckets (SGLang's flattened_bucket layout), announcing each bucket on
    /update_weights_from_distributed while it is being broadcast."""

    def __init__(self, target: WeightSyncTarget):
        self.target = target
        self.group = None
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(2, len(target.urls)))
        self.bytes_sent = 0

    def _post(self, url: str, path: str, body: dict) -> dict:
        req = urllib.request.Request(url + path, data=json.dumps(body).encode(), headers={"content-type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.target.timeout_s) as r:
                return json.loads(r.read() or b"null")
        except urllib.error.HTTPError as e:
            raise RolloutError(f"{url}{path} answered {e.code}: {e.read()[:500].decode(errors='replace')}") from None
        except (urllib.error.URLError, OSError) as e:
            raise RolloutError(f"{url}{path}: {e}") from None

    def _post_all(self, path: str, bodies: list[dict]) -> list[concurrent.futures.Future]:
        return [self._pool.submit(self._post, url, path, body) for url, body in zip(self.target.urls, bodies)]

    @staticmethod
    def _check(futures: list[concurrent.futures.Future], what: str) -> None:
        for f in futures:
            reply = f.result()
            if not (isinstance(reply, dict) and reply.get("success")):
                raise RolloutError(f"{what} failed: {reply}")

    def open(self) -> None:
        t = self.target
        port = free_port(t.master_address)
        world = 1 + sum(t.server_tp_sizes)
        offsets = [1 + sum(t.server_tp_sizes[:i]) for i in range(len(t.urls))]
        bodies = [
            {"master_address": t.master_address, "master_port": port, "rank_offset": off, "world_size": world, "group_name": t.group_name, "backend": t.backend}
            for off in offsets
        ]
        futures = self._post_all("/init_weights_update_group", bodies)
        self.group = weight_transport.open_update_group(
            master_address=t.master_address, master_port=port, rank=0, world_size=world, group_name=t.group_name, backend=t.backend, timeout_s=t.timeout_s
        )
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
            dist.broadcast(flat, src=0, group=self.group)
            self._check(futures, f"update_weights_from_distributed ({len(bucket)} tensors)")
            self.bytes_sent += flat.numel()

    def close(self) -> None:
        if self.group is not None:
            futures = self._post_all("/destroy_weights_update_group", [{"group_name": self.target.group_name}] * len(self.target.urls))
            for f in futures:
                try:
                    f.result()
                except RolloutError:
                    pass  # a server that died has no group left to destroy
            weight_transport.close_update_group(self.group)
            self.group = None
        self._pool.shutdown(wait=False)


def create_rollout_engine(cfg: RolloutConfig, model_path: str | None, observer: RequestObserver | None = None) -> SGLangEngine:
    """The rollout engine the config asks for (launching its servers when needed)."""
    return SGLangEngine.from_config(cfg, model_path, observer=observer)
