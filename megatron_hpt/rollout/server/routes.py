"""The HTTP routes: /generate, health, information and generation control, plus the
middlewares every route goes through (SGLang's --api-key check, error shaping).

Authentication follows SGLang's ``add_api_key_middleware``: with an API key, every
request needs ``Authorization: Bearer <key>`` (else 401 ``{"error": "Unauthorized"}``)
except OPTIONS requests and paths starting with /health or /metrics. No handler lets an
exception escape: a refused request gets its 4xx, anything unexpected a 500, both in
SGLang's body shapes.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from typing import Any

from aiohttp import web

from megatron_hpt.rollout.generation import SequenceResult, SequenceSpec
from megatron_hpt.rollout.server.replies import error_response, json_response, reply_item
from megatron_hpt.rollout.server.scheduler import GenerationFailed, PendingSequence
from megatron_hpt.rollout.server.state import ServerState
from megatron_hpt.rollout.server.threads import run_blocking
from megatron_hpt.rollout.server.validation import RequestRejected, Row, invalid, parse_generate, reject

log = logging.getLogger("megatron_hpt.rollout.server")

STATE = web.AppKey("state", ServerState)

_PARSE_IN_THREAD_BYTES = 1 << 20
"""Bodies larger than this are decoded and checked off the event loop."""


def _bearer_matches(header: str | None, key: bytes) -> bool:
    if not header:
        return False
    scheme, _, token = header.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.encode(), key)


def auth_middleware(api_key: str):
    key = api_key.encode()

    @web.middleware
    async def auth(request: web.Request, handler):
        if request.method == "OPTIONS" or request.path.startswith(("/health", "/metrics")):
            return await handler(request)
        if not _bearer_matches(request.headers.get("Authorization"), key):
            return json_response({"error": "Unauthorized"}, 401)
        return await handler(request)

    return auth


@web.middleware
async def error_middleware(request: web.Request, handler):
    try:
        return await handler(request)
    except RequestRejected as e:
        return json_response(e.body, e.status)
    except (web.HTTPException, asyncio.CancelledError):
        raise
    except Exception as e:  # a bug, not the request: answer it and keep serving
        log.exception("unexpected error on %s", request.path)
        return error_response(f"internal server error: {type(e).__name__}: {e}", 500)


async def read_object(request: web.Request, required: bool = True) -> dict:
    """The JSON object body of a request ({} when empty and not required)."""
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        limit = request.app[STATE].options.max_body_mb
        raise reject(f"the request body is larger than {limit:g} MB (--max-body-mb)", status=413) from None
    if not raw:
        if required:
            raise invalid("body", "Field required", None)
        return {}
    try:
        body = await run_blocking(json.loads, raw, name="json-decode") if len(raw) > _PARSE_IN_THREAD_BYTES else json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise invalid("body", f"JSON decode error: {type(e).__name__}: {str(e)[:200]}", raw[:200].decode(errors="replace")) from None
    if not isinstance(body, dict):
        raise invalid("body", "the request body must be a JSON object", body)
    return body


def _deadline_error(deadline_s: float, flag: str) -> RequestRejected:
    return reject(f"the request did not finish within the server's deadline of {deadline_s:g} s ({flag}); its sequences were aborted", status=503)


class GenerationRoutes:
    """/generate and /health_generate: submitting sequences and awaiting their results."""

    def __init__(self, state: ServerState):
        self.state = state
        self.live: dict[str, list[PendingSequence]] = {}
        """Running requests by rid (the request's and each row's), for /abort_request."""

    def _submit(self, rows: list[Row], deadline_s: float) -> list[PendingSequence]:
        """Queues the rows; RequestRejected (503) when the server is full."""
        scheduler = self.state.scheduler
        if not scheduler.try_reserve(len(rows)):
            raise reject(
                f"the server is full ({scheduler.pending} sequences pending, --max-pending-sequences "
                f"{scheduler.options.max_pending}); retry later or on another server",
                status=503,
            )
        loop = asyncio.get_running_loop()
        request_id, deadline = scheduler.new_request_id(), time.monotonic() + deadline_s
        pending = [
            PendingSequence(row=row, future=loop.create_future(), loop=loop, abort_epoch=scheduler.abort_epoch, deadline=deadline, request_id=request_id)
            for row in rows
        ]
        for p in pending:
            scheduler.submit(p)
        return pending

    async def _results(self, pending: list[PendingSequence], deadline_s: float, flag: str) -> list[SequenceResult]:
        """Every sequence's result by the deadline (``deadline_s``, set by ``flag``);
        RequestRejected (503 or 500) otherwise."""
        futures = [p.future for p in pending]
        try:
            _, late = await asyncio.wait(futures, timeout=max(0.0, pending[0].deadline - time.monotonic()))
        except asyncio.CancelledError:  # the client went away: stop its sequences
            for p in pending:
                p.abort_message = "Aborted: the client closed the connection."
            raise
        if late:
            for p in pending:
                p.abort_message = "Aborted: the request passed the server's deadline."
            for f in late:
                f.add_done_callback(_consume)
            raise _deadline_error(deadline_s, flag)
        failed = [f.exception() for f in futures if f.exception() is not None]
        if failed:
            raise reject(str(failed[0]), status=500 if isinstance(failed[0], GenerationFailed) else 503)
        if any(p.expired for p in pending):
            raise _deadline_error(deadline_s, flag)
        return [f.result() for f in futures]

    async def generate(self, request: web.Request) -> web.Response:
        start = time.monotonic()
        body = await read_object(request)
        args = (body, self.state.limits, self.state.encode)
        # Checking and tokenizing a large batch takes a while: not on the event loop.
        large = (request.content_length or 0) > _PARSE_IN_THREAD_BYTES
        parsed = await run_blocking(parse_generate, *args, name="parse-generate") if large else parse_generate(*args)
        if self.state.memory_released:
            raise reject("the model's memory is released; call /resume_memory_occupation first")
        rows = [row for group in parsed.groups for row in group]
        deadline_s = self.state.options.request_deadline_s
        pending = self._submit(rows, deadline_s)
        for rid in parsed.rids:
            self.live.setdefault(rid, []).extend(pending)
        try:
            results = await self._results(pending, deadline_s, "--request-deadline-s")
        finally:
            for rid in parsed.rids:
                self.live.pop(rid, None)
        latency = time.monotonic() - start
        items = [reply_item(p.row, r, self.state.weight_version, latency, self.state.decode) for p, r in zip(pending, results)]
        return json_response(items[0] if parsed.single else items)

    async def health_generate(self, request: web.Request) -> web.Response:
        """503 when the worker is dead or stuck; 200 when generation is held on purpose
        (paused, released) or running; when idle, 200 once a one-token generation works."""
        scheduler = self.state.scheduler
        problem = scheduler.problem()
        if problem is not None:
            return error_response(problem, 503)
        if scheduler.gate.generation_held() or scheduler.pending:
            return web.Response(status=200)
        spec = SequenceSpec(prompt_ids=(0,), max_new_tokens=1, temperature=0.0, top_k=1)
        row = Row(spec=spec, rid=f"HEALTH_CHECK_{uuid.uuid4().hex}", return_logprob=False, skip_special_tokens=True)
        try:
            await self._results(self._submit([row], scheduler.options.watchdog_s), scheduler.options.watchdog_s, "--watchdog-timeout-s")
        except RequestRejected as e:
            return error_response(f"a one-token health check generation failed: {e}", 503)
        return web.Response(status=200)

    async def abort_request(self, request: web.Request) -> web.Response:
        body = await read_object(request, required=False)
        rid, abort_all = body.get("rid"), body.get("abort_all", False)
        if rid is not None and not isinstance(rid, str):
            raise invalid("rid", "must be a string", rid)
        if not isinstance(abort_all, bool):
            raise invalid("abort_all", "must be a boolean", abort_all)
        if abort_all:
            self.state.scheduler.abort_all()
        elif rid:
            for p in self.live.get(rid, ()):
                p.abort_message = f"Aborted by /abort_request (rid {rid})."
        return web.Response(status=200)


def _consume(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()  # retrieved: a late failure nobody awaits is not logged as lost


class ControlRoutes:
    """Health, information, cache and pause routes."""

    def __init__(self, state: ServerState):
        self.state = state

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def model_info(self, request: web.Request) -> web.Response:
        s = self.state
        return json_response(
            {
                "model_path": s.model_path,
                "served_model_name": s.options.served_model_name or s.options.model_path,
                "tokenizer_path": s.options.model_path,
                "is_generation": True,
                "preferred_sampling_params": None,
                "weight_version": s.weight_version,
                "load_format": "auto",
                "has_image_understanding": False,
                "has_audio_understanding": False,
                "model_type": getattr(s.hf_config, "model_type", None),
                "architectures": getattr(s.hf_config, "architectures", None),
            }
        )

    async def server_info(self, request: web.Request) -> web.Response:
        s, scheduler = self.state, self.state.scheduler
        return json_response(
            {
                "model_path": s.model_path,
                "tokenizer_path": s.options.model_path,
                "context_length": s.limits.context_length,
                "device": s.device.type,
                "dtype": s.options.dtype,
                "tp_size": 1,
                "dp_size": 1,
                "max_running_requests": s.options.max_batch_size,
                "vocab_size": s.limits.vocab_size,
                "startup_time": s.startup_time,
                "launch_token": s.options.launch_token,
                "weight_version": s.weight_version,
                "internal_states": [_internal_state(s)],
                "version": "megatron-hpt-own-server",
                "frontend": "python",
            }
        )

    async def flush_cache(self, request: web.Request) -> web.Response:
        # No prefix cache is kept across batches, so there is nothing to drop.
        return web.Response(
            text="Cache flushed.\nPlease check backend logs for more details. "
            "(When there are running or waiting requests, the operation will not be performed.)\n"
        )

    async def pause_generation(self, request: web.Request) -> web.Response:
        body = await read_object(request, required=False)
        mode = body.get("mode", "abort")
        if mode not in ("abort", "retract", "in_place"):
            raise invalid("mode", "must be one of 'abort', 'retract', 'in_place'", mode)
        if mode == "abort":
            self.state.scheduler.abort_all()
        self.state.scheduler.gate.set_pause(mode)
        return json_response({"message": "Generation paused successfully.", "status": "ok"})

    async def continue_generation(self, request: web.Request) -> web.Response:
        self.state.scheduler.gate.set_pause(None)
        return json_response({"message": "Generation continued successfully.", "status": "ok"})


def _internal_state(s: ServerState) -> dict[str, Any]:
    gate = s.scheduler.gate
    return {
        "pending_sequences": s.scheduler.pending,
        "batch_running": gate.batch_active,
        "batch_parked": gate.parked,
        "paused": gate.pause_mode,
        "memory_released": s.memory_released,
        "weight_group_inits": s.group_inits,
        "worker_problem": s.scheduler.problem(),
    }


def build_app(state: ServerState) -> web.Application:
    from megatron_hpt.rollout.server.weight_routes import WeightRoutes

    middlewares = [error_middleware]
    if state.options.api_key is not None:
        middlewares.insert(0, auth_middleware(state.options.api_key))
    app = web.Application(middlewares=middlewares, client_max_size=int(state.options.max_body_mb * (1 << 20)))
    app[STATE] = state
    owners = (GenerationRoutes(state), ControlRoutes(state), WeightRoutes(state))
    for method, path, name in ROUTES:
        app.router.add_route(method, path, next(getattr(o, name) for o in owners if hasattr(o, name)))
    return app


ROUTES: list[tuple[str, str, str]] = [
    ("*", "/generate", "generate"),
    ("GET", "/health", "health"),
    ("GET", "/health_generate", "health_generate"),
    ("GET", "/model_info", "model_info"),
    ("GET", "/get_model_info", "model_info"),
    ("GET", "/server_info", "server_info"),
    ("GET", "/get_server_info", "server_info"),
    ("*", "/flush_cache", "flush_cache"),
    ("POST", "/update_weights_from_disk", "update_weights_from_disk"),
    ("POST", "/init_weights_update_group", "init_weights_update_group"),
    ("POST", "/destroy_weights_update_group", "destroy_weights_update_group"),
    ("POST", "/begin_weight_update", "begin_weight_update"),
    ("POST", "/update_weights_from_distributed", "update_weights_from_distributed"),
    ("POST", "/end_weight_update", "end_weight_update"),
    ("*", "/release_memory_occupation", "release_memory_occupation"),
    ("*", "/resume_memory_occupation", "resume_memory_occupation"),
    ("POST", "/pause_generation", "pause_generation"),
    ("POST", "/continue_generation", "continue_generation"),
    ("POST", "/abort_request", "abort_request"),
]
"""(method, path, handler name) of every route; "*" accepts any method, as SGLang does."""
