"""The project's own SGLang-protocol server: a real HTTP server over a Hugging Face
transformers model, the embedded default rollout engine (no extra install, starts in
seconds, CPU or GPU).

    python -m megatron_hpt.rollout.server --model-path DIR --port P [--device auto]

It answers the SGLang 0.5.23 routes the client uses (``protocol.py`` lists the
shapes): /generate, /health, /health_generate, /model_info, /server_info,
/flush_cache, /update_weights_from_disk, /init_weights_update_group,
/begin_weight_update, /update_weights_from_distributed, /end_weight_update,
/destroy_weights_update_group, /release_memory_occupation,
/resume_memory_occupation, /pause_generation, /continue_generation, /abort_request.

Requests are validated at the edge with SGLang's status codes and error bodies, and
unlike real SGLang an out-of-vocabulary id is refused (400) instead of crashing the
server. Features SGLang has and this server does not (stop strings, penalties,
grammars, streaming, top log-probs, ...) are refused with a 400 naming them, never
silently ignored. Generation runs on one worker thread: everything queued when it is
free becomes one batch (``generation.BatchGenerator``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from aiohttp import web

from megatron_hpt.rollout import protocol, weight_transport
from megatron_hpt.rollout.generation import TOP_K_ALL, BatchGenerator, SequenceSpec, StepHooks, seed_for_copy

log = logging.getLogger("megatron_hpt.rollout.server")

DEFAULT_MAX_NEW_TOKENS = 128
"""SGLang's default when a request gives no max_new_tokens."""


class RequestRejected(Exception):
    """A request the server answers with an error status and body."""

    def __init__(self, body: dict, status: int = 400):
        super().__init__(protocol.error_message(body))
        self.body, self.status = body, status


def _reject(message: str, status: int = 400) -> RequestRejected:
    return RequestRejected(protocol.request_error_body(message), status)


# Sampling keys this server implements, and the values of the others that are no-ops.
_NEUTRAL_SAMPLING_VALUES: dict[str, Any] = {
    "stop": [],
    "stop_regex": [],
    "min_p": 0.0,
    "frequency_penalty": 0.0,
    "presence_penalty": 0.0,
    "repetition_penalty": 1.0,
    "min_new_tokens": 0,
    "json_schema": "",
    "regex": "",
    "ebnf": "",
    "structural_tag": "",
    "logit_bias": {},
    "custom_params": {},
    "beam_width": 1,
    "watermark": {},
    "choice": [],
}
_IGNORED_SAMPLING_KEYS = ("spaces_between_special_tokens", "no_stop_trim", "stream_interval")
_UNSUPPORTED_REQUEST_KEYS = (
    "top_logprobs_num",
    "token_ids_logprob",
    "return_hidden_states",
    "image_data",
    "video_data",
    "audio_data",
    "lora_path",
    "session_params",
    "custom_logit_processor",
    "bootstrap_host",
    "input_embeds",
)


@dataclass
class Row:
    """One (prompt, sample) of a /generate request after validation."""

    spec: SequenceSpec
    rid: str
    return_logprob: bool
    skip_special_tokens: bool


@dataclass
class PendingSequence:
    row: Row
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    abort_epoch: int
    submitted: float = field(default_factory=time.monotonic)


class ServerState:
    """The model, its weights' identity, and the generation worker."""

    def __init__(self, args: argparse.Namespace):
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        self.args = args
        self.model_path = str(args.model_path)
        self.device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
        self.hf_config = AutoConfig.from_pretrained(self.model_path)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        self.model = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=dtype).to(self.device).eval()
        self.vocab_size = int(self.model.get_input_embeddings().weight.shape[0])
        self.context_length = int(args.context_length or getattr(self.hf_config, "max_position_embeddings", 4096))
        self.eos_ids = self._eos_ids()
        self.weight_version = args.weight_version
        self.model_lock = threading.Lock()
        self.generator = BatchGenerator(self.model, model_lock=self.model_lock)
        self.queue: queue.Queue[PendingSequence] = queue.Queue()
        self.abort_epoch = 0
        self.aborted_rids: dict[str, str] = {}
        self.paused = threading.Event()
        self.paused_mode = "abort"
        self.memory_released = False
        self.update_groups: dict[str, Any] = {}
        self.update_session_open = False
        self.busy_since: float | None = None
        self.last_step = time.monotonic()
        self.startup_time = time.time()
        self.worker = threading.Thread(target=self._work, name="generation-worker", daemon=True)
        self.worker.start()

    def _eos_ids(self) -> set[int]:
        ids: set[int] = set()
        for source in (getattr(self.model, "generation_config", None), self.hf_config):
            eos = getattr(source, "eos_token_id", None)
            if eos is not None:
                ids.update(eos if isinstance(eos, (list, tuple)) else [eos])
        return ids

    # -- the generation worker -------------------------------------------------

    def _work(self) -> None:
        torch.set_num_threads(self.args.threads)
        while True:
            batch = [self.queue.get()]
            # Requests sent together arrive over a few milliseconds (each is parsed on the
            # HTTP thread): keep collecting until none came for batch_wait_ms, so they
            # decode as one batch instead of queueing behind each other.
            quiet_s = self.args.batch_wait_ms / 1000.0
            deadline = time.monotonic() + 50 * quiet_s
            while len(batch) < self.args.max_batch_size and time.monotonic() < deadline:
                try:
                    batch.append(self.queue.get(timeout=quiet_s))
                except queue.Empty:
                    break
            while self.paused.is_set():
                time.sleep(0.01)
            live = []
            for p in batch:
                message = self._abort_message(p)
                if message is not None:
                    self._deliver(p, "abort", message)
                else:
                    live.append(p)
            if not live:
                continue
            self.busy_since = time.monotonic()
            try:
                results = self.generator.generate([p.row.spec for p in live], tags=live, hooks=_Hooks(self))
            except Exception as e:  # a failed batch answers its requests, the server lives on
                log.exception("generation failed")
                for p in live:
                    p.loop.call_soon_threadsafe(_set_exception, p.future, e)
            else:
                for p, r in zip(live, results):
                    p.loop.call_soon_threadsafe(_set_result, p.future, r)
            finally:
                self.busy_since = None

    def _abort_message(self, p: PendingSequence) -> str | None:
        if p.abort_epoch < self.abort_epoch:
            return "Aborted by /abort_request (abort_all) or /pause_generation."
        return self.aborted_rids.get(p.row.rid)

    def _deliver(self, p: PendingSequence, kind: str, message: str) -> None:
        from megatron_hpt.rollout.generation import SequenceResult

        result = SequenceResult(finish_type=kind, abort_message=message)
        p.loop.call_soon_threadsafe(_set_result, p.future, result)

    # -- weights ------------------------------------------------------------------

    def load_named_tensors(self, named: dict[str, torch.Tensor]) -> int:
        """Copies HF-named tensors into the model (all checked first, then all copied)."""
        params = dict(self.model.named_parameters())
        params.update(dict(self.model.named_buffers()))
        unknown = [n for n in named if n not in params]
        if unknown:
            raise ValueError(f"unknown parameter names {unknown[:5]} (the model has e.g. {list(params)[:3]})")
        for n, t in named.items():
            if tuple(t.shape) != tuple(params[n].shape):
                raise ValueError(f"{n}: shape {tuple(t.shape)} does not match the model's {tuple(params[n].shape)}")
        with self.model_lock, torch.no_grad():
            for n, t in named.items():
                params[n].copy_(t.to(params[n].device, params[n].dtype))
        return len(named)


def _set_result(fut: asyncio.Future, value) -> None:
    if not fut.done():
        fut.set_result(value)


def _set_exception(fut: asyncio.Future, exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)


class _Hooks(StepHooks):
    def __init__(self, state: ServerState):
        self.state = state

    def before_step(self) -> None:
        self.state.last_step = time.monotonic()
        while self.state.paused.is_set() and self.state.paused_mode != "abort":
            time.sleep(0.01)

    def aborted(self, tag: PendingSequence) -> str | None:
        return self.state._abort_message(tag)

    def weight_version(self) -> str:
        return self.state.weight_version


# -- request parsing --------------------------------------------------------------


def _as_list(value: Any, count: int, name: str) -> list:
    if isinstance(value, list):
        if len(value) != count:
            raise _reject(f"{name} has {len(value)} entries but the request has {count} prompts")
        return value
    return [value] * count


def parse_generate(body: Any, state: ServerState) -> tuple[list[list[Row]], bool]:
    """Validates a /generate body; returns rows grouped by prompt and whether the reply is
    a single object (one prompt given as a flat list or a string, and n == 1)."""
    if not isinstance(body, dict):
        raise RequestRejected(protocol.validation_error_body("body", "the request body must be a JSON object", body))
    input_ids, text = body.get("input_ids"), body.get("text")
    if input_ids is not None:
        if not isinstance(input_ids, list):
            raise RequestRejected(protocol.validation_error_body("input_ids", f"must be list or null; got {type(input_ids).__name__}", input_ids))
        bad = [e for e in input_ids if not (isinstance(e, list) or protocol._is_int(e))]
        if bad:
            raise RequestRejected(protocol.validation_error_body("input_ids", f"elements must be int or list; got {type(bad[0]).__name__}", input_ids))
    if text is not None and not (isinstance(text, str) or (isinstance(text, list) and all(isinstance(t, str) for t in text))):
        raise RequestRejected(protocol.validation_error_body("text", "must be a string or a list of strings", text))
    sampling = body.get("sampling_params")
    if sampling is not None and not isinstance(sampling, (dict, list)):
        raise RequestRejected(protocol.validation_error_body("sampling_params", "must be an object or a list of objects", sampling))
    for key in ("return_logprob",):
        v = body.get(key)
        if v is not None and not (isinstance(v, bool) or (isinstance(v, list) and all(isinstance(e, bool) for e in v))):
            raise RequestRejected(protocol.validation_error_body(key, "must be a boolean or a list of booleans", v))
    v = body.get("logprob_start_len")
    if v is not None and not (protocol._is_int(v) or (isinstance(v, list) and all(protocol._is_int(e) for e in v))):
        raise RequestRejected(protocol.validation_error_body("logprob_start_len", "must be an integer or a list of integers", v))
    # The JSON contract gate on every sampling_params object.
    for sp in sampling if isinstance(sampling, list) else ([sampling] if sampling is not None else []):
        message = protocol.sampling_params_contract_error(sp)
        if message is not None:
            raise RequestRejected(protocol.contract_error_body(message))

    if body.get("stream"):
        raise _reject("streaming (stream=true) is not supported by this server")
    for key in _UNSUPPORTED_REQUEST_KEYS:
        v = body.get(key)
        if v not in (None, False, 0, [], {}):
            raise _reject(f"{key} is not supported by this server")

    if input_ids is None and text is None:
        raise _reject("Either text, input_ids or input_embeds should be provided.")
    if input_ids is not None:
        single = not input_ids or not isinstance(input_ids[0], list)
        prompts = [input_ids] if single else input_ids
    else:
        single = isinstance(text, str)
        texts = [text] if single else text
        prompts = [state.tokenizer.encode(t) for t in texts]
    for i, p in enumerate(prompts):
        if not isinstance(p, list) or not all(protocol._is_int(t) for t in p):
            raise RequestRejected(protocol.validation_error_body("input_ids", "elements must be int or list", input_ids))
        if not p:
            raise _reject("input_ids cannot be empty.")
        oov = [t for t in p if not 0 <= t < state.vocab_size]
        if oov:
            where = "" if single else f" of prompt {i}"
            raise _reject(f"token id {oov[0]} at position {p.index(oov[0])}{where} is outside the vocabulary [0, {state.vocab_size})")

    count = len(prompts)
    sp_list = _as_list(sampling if sampling is not None else {}, count, "sampling_params")
    lp_list = _as_list(body.get("return_logprob") or False, count, "return_logprob")
    start_list = _as_list(body.get("logprob_start_len", -1), count, "logprob_start_len")
    rid = body.get("rid")
    rid_list = _as_list(rid, count, "rid") if rid is not None else [None] * count
    groups = []
    for i, (prompt, sp) in enumerate(zip(prompts, sp_list)):
        groups.append(_rows_for_prompt(prompt, sp, bool(lp_list[i]), int(start_list[i] if start_list[i] is not None else -1), rid_list[i], state))
    single = single and len(groups[0]) == 1
    return groups, single


def _rows_for_prompt(prompt: list[int], sp: dict, return_logprob: bool, start: int, rid: str | None, state: ServerState) -> list[Row]:
    for key, neutral in _NEUTRAL_SAMPLING_VALUES.items():
        v = sp.get(key)
        if v is not None and v != neutral and not (key == "beam_width" and v == 1):
            raise _reject(f"sampling_params.{key}={v!r} is not supported by this server")
    temperature = float(sp["temperature"]) if sp.get("temperature") is not None else 1.0
    top_p = float(sp["top_p"]) if sp.get("top_p") is not None else 1.0
    top_k = int(sp["top_k"]) if sp.get("top_k") is not None else -1
    max_new = int(sp["max_new_tokens"]) if sp.get("max_new_tokens") is not None else DEFAULT_MAX_NEW_TOKENS
    n = max(1, int(sp.get("n") or 1))
    seed = sp.get("sampling_seed")
    if not math.isfinite(temperature) or temperature < 0:
        raise _reject(f"temperature must be a non-negative finite number, got {sp['temperature']}.")
    if not 0.0 < top_p <= 1.0:
        raise _reject(f"top_p must be in (0, 1], got {sp['top_p']}.")
    if top_k != -1 and top_k < 1:
        raise _reject(f"top_k must be -1 (disable) or at least 1, got {top_k}.")
    if max_new < 0:
        raise _reject(f"max_new_tokens must be at least 0, got {max_new}.")
    if seed is not None and not protocol.I64_MIN <= seed <= protocol.I64_MAX:
        raise _reject(f"sampling_seed must be in [-2**63, 2**63 - 1], got {seed}.")
    if len(prompt) >= state.context_length + 1:
        raise _reject(f"The input ({len(prompt)} tokens) is longer than the model's context length ({state.context_length} tokens).")
    if len(prompt) + max_new > state.context_length:
        raise _reject(
            f"Requested token count exceeds the model's maximum context length of {state.context_length} tokens. "
            f"You requested a total of {len(prompt) + max_new} tokens: {len(prompt)} tokens from the input messages "
            f"and {max_new} tokens for the completion. Please reduce the number of tokens in the input messages or the "
            "completion to fit within the limit."
        )
    if 0 <= temperature < 1e-6:
        temperature, top_k = 0.0, 1
    stops = set(int(t) for t in (sp.get("stop_token_ids") or []))
    if not sp.get("ignore_eos"):
        stops |= state.eos_ids
    if start >= len(prompt):
        raise _reject(f"logprob_start_len ({start}) must be smaller than the prompt length ({len(prompt)})")
    rows = []
    for j in range(n):
        row_seed = seed_for_copy(int(seed), j) if seed is not None else int.from_bytes(os.urandom(8), "little", signed=True)
        spec = SequenceSpec(
            prompt_ids=tuple(prompt),
            max_new_tokens=max_new,
            temperature=temperature,
            top_p=top_p,
            top_k=TOP_K_ALL if top_k == -1 else top_k,
            stop_token_ids=frozenset(stops),
            seed=row_seed,
            input_logprobs_from=start if return_logprob else -1,
        )
        row_rid = rid if rid is not None else uuid.uuid4().hex
        if rid is not None and n > 1:
            row_rid = f"{rid}_{j}"
        skip = sp.get("skip_special_tokens")
        rows.append(Row(spec=spec, rid=row_rid, return_logprob=return_logprob, skip_special_tokens=True if skip is None else bool(skip)))
    return rows


def reply_item(row: Row, result, state: ServerState, latency: float) -> dict:
    ids = result.output_ids
    text_ids = ids[:-1] if result.finish_type == "stop" and ids and ids[-1] == result.matched_stop else ids
    if result.finish_type == "stop":
        finish = protocol.finish_stop(result.matched_stop)
    elif result.finish_type == "length":
        finish = protocol.finish_length(len(ids))
    else:
        finish = protocol.finish_abort(result.abort_message or "aborted")
    meta: dict[str, Any] = {
        "id": row.rid,
        "finish_reason": finish,
        "prompt_tokens": len(row.spec.prompt_ids),
        "weight_version": result.weight_versions[-1][0] if result.weight_versions else state.weight_version,
    }
    if row.return_logprob:
        start = row.spec.input_logprobs_from
        input_lp = result.input_logprobs or []
        meta["input_token_logprobs"] = [[lp, row.spec.prompt_ids[start + k], None] for k, lp in enumerate(input_lp)] if start >= 0 else []
        meta["output_token_logprobs"] = [[lp, t, None] for lp, t in zip(result.output_logprobs, ids)]
        meta["output_token_logprobs_length"] = len(ids)
    meta.update(
        reasoning_tokens=0,
        completion_tokens=len(ids),
        cached_tokens=0,
        weight_versions=[{"version": v, "start": s, "end": e} for v, s, e in result.weight_versions]
        or [{"version": state.weight_version, "start": 0, "end": 0}],
        e2e_latency=latency,
    )
    return {
        "text": state.tokenizer.decode(text_ids, skip_special_tokens=row.skip_special_tokens),
        "output_ids": ids,
        "meta_info": meta,
    }


# -- HTTP handlers ------------------------------------------------------------------


def _json(body: Any, status: int = 200) -> web.Response:
    return web.json_response(body, status=status, dumps=lambda o: json.dumps(o, allow_nan=True))


async def _body(request: web.Request, required: bool = True) -> Any:
    raw = await request.read()
    if not raw:
        if required:
            raise RequestRejected(protocol.validation_error_body("body", "Field required", None))
        return {}
    try:
        return json.loads(raw)
    except json.JSONDecodeError as e:
        raise RequestRejected(protocol.validation_error_body("body", f"JSON decode error: {e}", raw[:200].decode(errors="replace"))) from None


def _auth(api_key: str | None):
    """SGLang's --api-key scheme: every route but /health* wants "Authorization: Bearer <key>"."""

    @web.middleware
    async def check(request: web.Request, handler):
        if api_key and not request.path.startswith("/health"):
            if request.headers.get("Authorization", "") != f"Bearer {api_key}":
                return _json({"error": "Unauthorized"}, 401)
        return await handler(request)

    return check


@web.middleware
async def _errors(request: web.Request, handler):
    try:
        return await handler(request)
    except RequestRejected as e:
        return _json(e.body, e.status)


def build_app(state: ServerState) -> web.Application:
    app = web.Application(middlewares=[_auth(state.args.api_key), _errors], client_max_size=1 << 30)
    routes = web.RouteTableDef()

    @routes.route("*", "/generate")
    async def generate(request: web.Request):
        start = time.monotonic()
        body = await _body(request)
        groups, single = parse_generate(body, state)
        if state.memory_released:
            raise _reject("the model's memory is released; call /resume_memory_occupation first")
        loop = asyncio.get_running_loop()
        pending = []
        for rows in groups:
            for row in rows:
                p = PendingSequence(row=row, future=loop.create_future(), loop=loop, abort_epoch=state.abort_epoch)
                state.queue.put(p)
                pending.append(p)
        try:
            results = await asyncio.wait_for(asyncio.gather(*(p.future for p in pending)), state.args.request_deadline_s)
        except Exception as e:
            raise _reject(f"generation failed: {e}", status=500) from e
        latency = time.monotonic() - start
        items = [reply_item(p.row, r, state, latency) for p, r in zip(pending, results)]
        return _json(items[0] if single else items)

    @routes.get("/health")
    async def health(request):
        return web.Response(status=200)

    @routes.get("/health_generate")
    async def health_generate(request):
        if state.busy_since is not None:
            # Busy: healthy as long as decode steps keep coming.
            return web.Response(status=200 if time.monotonic() - state.last_step < 60 else 503)
        spec = SequenceSpec(prompt_ids=(0,), max_new_tokens=1, temperature=0.0, top_k=1)
        loop = asyncio.get_running_loop()
        row = Row(spec=spec, rid=f"HEALTH_CHECK_{uuid.uuid4().hex}", return_logprob=False, skip_special_tokens=True)
        p = PendingSequence(row=row, future=loop.create_future(), loop=loop, abort_epoch=state.abort_epoch)
        state.queue.put(p)
        try:
            await asyncio.wait_for(p.future, timeout=20)
        except Exception:
            return web.Response(status=503)
        return web.Response(status=200)

    @routes.get("/model_info")
    @routes.get("/get_model_info")
    async def model_info(request):
        return _json(
            {
                "model_path": state.model_path,
                "served_model_name": state.args.served_model_name or str(state.args.model_path),
                "tokenizer_path": str(state.args.model_path),
                "is_generation": True,
                "preferred_sampling_params": None,
                "weight_version": state.weight_version,
                "load_format": "auto",
                "has_image_understanding": False,
                "has_audio_understanding": False,
                "model_type": getattr(state.hf_config, "model_type", None),
                "architectures": getattr(state.hf_config, "architectures", None),
            }
        )

    @routes.get("/server_info")
    @routes.get("/get_server_info")
    async def server_info(request):
        return _json(
            {
                "model_path": state.model_path,
                "tokenizer_path": str(state.args.model_path),
                "context_length": state.context_length,
                "device": state.device.type,
                "dtype": state.args.dtype,
                "tp_size": 1,
                "dp_size": 1,
                "max_running_requests": state.args.max_batch_size,
                "vocab_size": state.vocab_size,
                "startup_time": state.startup_time,
                "internal_states": [{"queued_sequences": state.queue.qsize(), "busy": state.busy_since is not None}],
                "version": "megatron-hpt-own-server",
                "launch_token": state.args.launch_token,
                "frontend": "python",
            }
        )

    @routes.route("*", "/flush_cache")
    async def flush_cache(request):
        # No prefix cache is kept across batches, so there is nothing to drop.
        return web.Response(
            text="Cache flushed.\nPlease check backend logs for more details. "
            "(When there are running or waiting requests, the operation will not be performed.)\n"
        )

    @routes.post("/update_weights_from_disk")
    async def update_weights_from_disk(request):
        body = await _body(request)
        if not isinstance(body, dict) or not isinstance(body.get("model_path"), str):
            raise RequestRejected(protocol.validation_error_body("model_path", "Field required (a string)", body))
        path = body["model_path"]
        allowed = state.args.weight_dir
        if allowed and not Path(path).resolve().is_relative_to(Path(allowed).resolve()):
            return _json({"success": False, "message": f"{path} is outside --weight-dir {allowed}", "num_paused_requests": 0}, 400)
        try:
            named = await asyncio.to_thread(weight_transport.read_safetensors_dir, path)
            count = await asyncio.to_thread(state.load_named_tensors, named)
        except Exception as e:
            return _json({"success": False, "message": f"Failed to update weights: {e}", "num_paused_requests": 0}, 400)
        state.model_path = path
        message = f"Succeeded to update model weights ({count} tensors)."
        if body.get("weight_version") is not None:
            state.weight_version = str(body["weight_version"])
            message += f" Weight version updated to {state.weight_version}."
        return _json({"success": True, "message": message, "num_paused_requests": 0})

    @routes.post("/init_weights_update_group")
    async def init_weights_update_group(request):
        body = await _body(request)
        missing = [k for k in ("master_address", "master_port", "rank_offset", "world_size") if not isinstance(body, dict) or k not in body]
        if missing:
            raise RequestRejected(protocol.validation_error_body(missing[0], "Field required", body))
        name = body.get("group_name", "weight_update_group")
        backend = body.get("backend") or ("nccl" if state.device.type == "cuda" else "gloo")
        try:
            pg = await asyncio.to_thread(
                weight_transport.open_update_group,
                master_address=body["master_address"],
                master_port=int(body["master_port"]),
                rank=int(body["rank_offset"]),
                world_size=int(body["world_size"]),
                group_name=name,
                backend=backend,
            )
        except Exception as e:
            return _json({"success": False, "message": f"Failed to initialize custom process group: {e}."}, 400)
        state.update_groups[name] = pg
        return _json({"success": True, "message": "Succeeded to initialize custom process group."})

    @routes.post("/destroy_weights_update_group")
    async def destroy_weights_update_group(request):
        body = await _body(request, required=False)
        name = body.get("group_name", "weight_update_group")
        pg = state.update_groups.pop(name, None)
        if pg is None:
            return _json({"success": False, "message": "The group to be destroyed does not exist."}, 400)
        weight_transport.close_update_group(pg)
        return _json({"success": True, "message": "Succeeded to destroy custom process group."})

    @routes.post("/begin_weight_update")
    async def begin_weight_update(request):
        state.update_session_open = True
        return _json({"success": True, "message": "Success"})

    @routes.post("/end_weight_update")
    async def end_weight_update(request):
        state.update_session_open = False
        return _json({"success": True, "message": "Success"})

    @routes.post("/update_weights_from_distributed")
    async def update_weights_from_distributed(request):
        body = await _body(request)
        names, dtypes, shapes = body.get("names"), body.get("dtypes"), body.get("shapes")
        if not (isinstance(names, list) and isinstance(dtypes, list) and isinstance(shapes, list)) or not len(names) == len(dtypes) == len(shapes):
            raise RequestRejected(protocol.validation_error_body("names", "names, dtypes and shapes must be lists of one length", body))
        if not state.update_session_open:
            return _json(
                {"success": False, "message": "update_weights_from_distributed must run between begin_weight_update() and end_weight_update()"},
                400,
            )
        name = body.get("group_name", "weight_update_group")
        pg = state.update_groups.get(name)
        if pg is None:
            return _json({"success": False, "message": f"Group {name} not in {list(state.update_groups)}. Please call `init_weights_update_group` first."}, 400)
        try:
            received = await asyncio.to_thread(_receive_weights, state, pg, names, dtypes, shapes, body.get("load_format"))
            await asyncio.to_thread(state.load_named_tensors, dict(zip(names, received)))
        except Exception as e:
            return _json({"success": False, "message": f"Failed to receive weights: {e}"}, 400)
        message = "Succeeded to update parameter online."
        if body.get("weight_version") is not None:
            state.weight_version = str(body["weight_version"])
            message += f" Weight version updated to {state.weight_version}."
        return _json({"success": True, "message": message})

    @routes.route("*", "/release_memory_occupation")
    async def release_memory_occupation(request):
        await asyncio.to_thread(_move_model, state, "cpu")
        state.memory_released = True
        return _json(None)

    @routes.route("*", "/resume_memory_occupation")
    async def resume_memory_occupation(request):
        await asyncio.to_thread(_move_model, state, state.device)
        state.memory_released = False
        return _json(None)

    @routes.post("/pause_generation")
    async def pause_generation(request):
        body = await _body(request, required=False)
        mode = body.get("mode", "abort") if isinstance(body, dict) else "abort"
        if mode not in ("abort", "retract", "in_place"):
            raise RequestRejected(protocol.validation_error_body("mode", "must be one of 'abort', 'retract', 'in_place'", mode))
        state.paused_mode = mode
        state.paused.set()
        if mode == "abort":
            state.abort_epoch += 1
        return _json({"message": "Generation paused successfully.", "status": "ok"})

    @routes.post("/continue_generation")
    async def continue_generation(request):
        state.paused.clear()
        return _json({"message": "Generation continued successfully.", "status": "ok"})

    @routes.post("/abort_request")
    async def abort_request(request):
        body = await _body(request, required=False)
        if body.get("abort_all"):
            state.abort_epoch += 1
        elif body.get("rid"):
            rid = str(body["rid"])
            state.aborted_rids[rid] = f"Aborted by /abort_request (rid {rid})."
        return web.Response(status=200)

    app.add_routes(routes)
    return app


def _receive_weights(state: ServerState, pg, names, dtypes, shapes, load_format) -> list[torch.Tensor]:
    import torch.distributed as dist

    device = state.device
    torch_dtypes = [weight_transport.dtype_from_name(d) for d in dtypes]
    if load_format == "flattened_bucket":
        nbytes = sum(math.prod(s) * torch.empty((), dtype=d).element_size() for d, s in zip(torch_dtypes, shapes))
        flat = torch.empty(nbytes, dtype=torch.uint8, device=device)
        dist.broadcast(flat, src=0, group=pg)
        return weight_transport.unflatten_bucket(flat, torch_dtypes, shapes)
    out = []
    for d, s in zip(torch_dtypes, shapes):
        t = torch.empty(s, dtype=d, device=device)
        dist.broadcast(t, src=0, group=pg)
        out.append(t)
    return out


def _move_model(state: ServerState, device) -> None:
    with state.model_lock:
        state.model.to(device)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m megatron_hpt.rollout.server", description=__doc__.split("\n\n")[0])
    p.add_argument("--model-path", required=True, help="HF checkpoint folder (config, safetensors, tokenizer)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu or cuda[:i]")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--context-length", type=int, default=None, help="defaults to the model's max_position_embeddings")
    p.add_argument("--max-batch-size", type=int, default=256, help="most sequences decoded together")
    p.add_argument("--batch-wait-ms", type=float, default=5.0, help="a batch closes once no request came for this long")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (more only on cores nobody else uses)")
    p.add_argument("--served-model-name", default=None)
    p.add_argument("--log-level", default="warning")
    p.add_argument("--api-key", default=None, help="require Authorization: Bearer KEY on every route but /health*")
    p.add_argument("--launch-token", default=None, help="reported by /get_server_info as launch_token")
    p.add_argument("--weight-version", default="default", help="the version of the weights it starts with")
    p.add_argument("--request-deadline-s", type=float, default=None, help="longest a /generate request may take")
    p.add_argument("--weight-dir", default=None, help="the only folder /update_weights_from_disk may read")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="[%(asctime)s] %(name)s %(levelname)s: %(message)s")
    if not Path(args.model_path, "config.json").is_file():
        raise SystemExit(f"--model-path {args.model_path!r} has no config.json: pass an HF checkpoint folder")
    torch.set_num_threads(args.threads)
    state = ServerState(args)
    app = build_app(state)
    print(f"megatron-hpt rollout server: {args.model_path} on {state.device} at http://{args.host}:{args.port}", flush=True)
    web.run_app(app, host=args.host, port=args.port, print=None, access_log=None, handle_signals=True)


if __name__ == "__main__":
    main()
