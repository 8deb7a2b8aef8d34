"""Shaping what the server sends back: /generate reply items as SGLang 0.5.23 writes them
(``protocol.py``), and JSON responses."""

from __future__ import annotations

import json
from typing import Any, Callable

from aiohttp import web

from megatron_hpt.rollout import protocol
from megatron_hpt.rollout.generation import SequenceResult
from megatron_hpt.rollout.server.validation import Row


def json_response(body: Any, status: int = 200) -> web.Response:
    # Log-probs may be -inf; Python's json writes it as SGLang's orjson does not, but
    # both the client and SGLang's contract read it.
    return web.json_response(body, status=status, dumps=lambda o: json.dumps(o, allow_nan=True))


def error_response(message: str, status: int) -> web.Response:
    return json_response(protocol.request_error_body(message), status)


def _finish_reason(result: SequenceResult) -> dict:
    if result.finish_type == "stop":
        return protocol.finish_stop(result.matched_stop)
    if result.finish_type == "length":
        return protocol.finish_length(len(result.output_ids))
    return protocol.finish_abort(result.abort_message or "aborted")


def reply_item(row: Row, result: SequenceResult, current_version: str, latency: float, decode: Callable[[list[int], bool], str]) -> dict:
    """One /generate reply item. ``meta_info.weight_version`` is the version the sequence
    was started (prefilled) with: a sequence spans two versions only when weights were
    swapped during an in-place pause, and then ``weight_versions`` lists each span."""
    ids = result.output_ids
    text_ids = ids[:-1] if result.finish_type == "stop" and ids and ids[-1] == result.matched_stop else ids
    version = result.weight_version if result.weight_version is not None else current_version
    meta: dict[str, Any] = {
        "id": row.rid,
        "finish_reason": _finish_reason(result),
        "prompt_tokens": len(row.spec.prompt_ids),
        "weight_version": version,
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
        or [{"version": version, "start": 0, "end": 0}],
        e2e_latency=latency,
    )
    return {"text": decode(text_ids, row.skip_special_tokens), "output_ids": ids, "meta_info": meta}
