"""Checking /generate bodies at the edge: every value a request can carry is validated
here, with SGLang's status codes and error bodies (``protocol.py`` lists the three
shapes), before anything reaches the generation worker. A request the server cannot
serve is refused with a 400 naming the key; sizes are bounded (``Limits``) so no single
request can hold the event loop or the memory for long.
"""

from __future__ import annotations

import math
import os
import uuid
from dataclasses import dataclass
from typing import Any, Callable

from megatron_hpt.rollout import protocol
from megatron_hpt.rollout.generation import TOP_K_ALL, SequenceSpec, seed_for_copy

DEFAULT_MAX_NEW_TOKENS = 128
"""SGLang's default when a request gives no max_new_tokens."""


class RequestRejected(Exception):
    """A request the server answers with an error status and body."""

    def __init__(self, body: dict, status: int = 400):
        super().__init__(protocol.error_message(body))
        self.body, self.status = body, status


def reject(message: str, status: int = 400) -> RequestRejected:
    """A refusal in SGLang's request-check shape ``{"error": {"message"}}``."""
    return RequestRejected(protocol.request_error_body(message), status)


def invalid(field: str, message: str, value: Any) -> RequestRejected:
    """A refusal in SGLang's request-validation shape (a top-level field of a wrong type)."""
    return RequestRejected(protocol.validation_error_body(field, message, _preview(value)))


def _preview(value: Any) -> Any:
    # The offending value is echoed back; keep a huge one from making a huge reply.
    text = repr(value)
    return value if len(text) <= 200 else text[:200] + "..."


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


@dataclass(kw_only=True, frozen=True)
class Limits:
    """What one /generate request may ask of this server."""

    vocab_size: int
    context_length: int
    """Longest prompt + response."""
    eos_ids: frozenset[int]
    """The model's end-of-sequence ids (stop tokens unless ignore_eos)."""
    max_sequences_per_request: int
    """Most (prompt, sample) rows one request may expand to: bounds n and the prompt count."""


@dataclass
class Row:
    """One (prompt, sample) of a /generate request after validation."""

    spec: SequenceSpec
    rid: str
    return_logprob: bool
    skip_special_tokens: bool


@dataclass
class ParsedRequest:
    groups: list[list[Row]]
    """Rows grouped by prompt, prompt-major (SGLang's reply order)."""
    single: bool
    """The reply is one object (one prompt given flat or as a string, and n == 1)."""
    rids: list[str]
    """Every rid /abort_request may name for this request (the request's and its rows')."""


def _is_bool_or_list(v: Any) -> bool:
    return isinstance(v, bool) or (isinstance(v, list) and all(isinstance(e, bool) for e in v))


def _is_int_or_list(v: Any) -> bool:
    return protocol._is_int(v) or (isinstance(v, list) and all(protocol._is_int(e) for e in v))


def _is_str_or_list(v: Any) -> bool:
    return isinstance(v, str) or (isinstance(v, list) and all(isinstance(e, str) for e in v))


def _check_top_level_types(body: dict) -> None:
    """SGLang's request validation (first error shape) on every field this server reads."""
    input_ids = body.get("input_ids")
    if input_ids is not None:
        if not isinstance(input_ids, list):
            raise invalid("input_ids", f"must be list or null; got {type(input_ids).__name__}", input_ids)
        bad = [e for e in input_ids if not (isinstance(e, list) or protocol._is_int(e))]
        if bad:
            raise invalid("input_ids", f"elements must be int or list; got {type(bad[0]).__name__}", input_ids)
    checks: list[tuple[str, Callable[[Any], bool], str]] = [
        ("text", _is_str_or_list, "must be a string or a list of strings"),
        ("rid", _is_str_or_list, "must be a string or a list of strings"),
        ("sampling_params", lambda v: isinstance(v, (dict, list)), "must be an object or a list of objects"),
        ("return_logprob", _is_bool_or_list, "must be a boolean or a list of booleans"),
        ("logprob_start_len", _is_int_or_list, "must be an integer or a list of integers"),
        ("stream", lambda v: isinstance(v, bool), "must be a boolean"),
    ]
    for key, ok, message in checks:
        v = body.get(key)
        if v is not None and not ok(v):
            raise invalid(key, message, v)
    sampling = body.get("sampling_params")
    for sp in sampling if isinstance(sampling, list) else ([sampling] if sampling is not None else []):
        message = protocol.sampling_params_contract_error(sp)
        if message is not None:
            raise RequestRejected(protocol.contract_error_body(message))


def _check_supported(body: dict) -> None:
    if body.get("stream"):
        raise reject("streaming (stream=true) is not supported by this server")
    for key in _UNSUPPORTED_REQUEST_KEYS:
        v = body.get(key)
        if v not in (None, False, 0, [], {}):
            raise reject(f"{key} is not supported by this server")


def _prompts(body: dict, limits: Limits, encode: Callable[[str], list[int]]) -> tuple[list[list[int]], bool]:
    """The request's prompts as token ids, and whether it gave a single prompt."""
    input_ids, text = body.get("input_ids"), body.get("text")
    if input_ids is None and text is None:
        raise reject("Either text, input_ids or input_embeds should be provided.")
    if input_ids is not None:
        single = not input_ids or not isinstance(input_ids[0], list)
        prompts = [input_ids] if single else input_ids
    else:
        single = isinstance(text, str)
        prompts = [text] if single else text
    if not prompts:
        raise reject("the request has no prompts (an empty list).")
    _check_count("prompts", len(prompts), limits)
    if input_ids is None:
        prompts = [encode(t) for t in prompts]
    for i, p in enumerate(prompts):
        if not isinstance(p, list) or not all(protocol._is_int(t) for t in p):
            raise invalid("input_ids", "elements must be int or list (one level of nesting at most)", input_ids)
        if not p:
            raise reject("input_ids cannot be empty.")
        oov = [t for t in p if not 0 <= t < limits.vocab_size]
        if oov:
            where = "" if single else f" of prompt {i}"
            raise reject(f"token id {oov[0]} at position {p.index(oov[0])}{where} is outside the vocabulary [0, {limits.vocab_size})")
    return prompts, single


def _check_count(what: str, count: int, limits: Limits) -> None:
    if count > limits.max_sequences_per_request:
        raise reject(
            f"the request asks for {count} {what}, more than this server takes in one request "
            f"({limits.max_sequences_per_request}, --max-sequences-per-request); split it into smaller requests"
        )


def _per_prompt(value: Any, count: int, name: str) -> list:
    if isinstance(value, list):
        if len(value) != count:
            raise reject(f"{name} has {len(value)} entries but the request has {count} prompts")
        return value
    return [value] * count


def parse_generate(body: Any, limits: Limits, encode: Callable[[str], list[int]]) -> ParsedRequest:
    """Validates a /generate body; raises RequestRejected with SGLang's status and body."""
    if not isinstance(body, dict):
        raise invalid("body", "the request body must be a JSON object", body)
    _check_top_level_types(body)
    _check_supported(body)
    prompts, single = _prompts(body, limits, encode)
    count = len(prompts)
    sp_list = _per_prompt(body.get("sampling_params") or {}, count, "sampling_params")
    lp_list = _per_prompt(body.get("return_logprob") or False, count, "return_logprob")
    start_list = _per_prompt(body.get("logprob_start_len", -1), count, "logprob_start_len")
    rid = body.get("rid")
    rid_list = _per_prompt(rid, count, "rid") if rid is not None else [None] * count
    ns = [_n_of(sp) for sp in sp_list]
    _check_count("sequences (prompts x n)", sum(ns), limits)
    groups = [
        _rows_for_prompt(prompt, sp, n, bool(lp), -1 if start is None else start, r, limits)
        for prompt, sp, n, lp, start, r in zip(prompts, sp_list, ns, lp_list, start_list, rid_list)
    ]
    rids = [r for r in rid_list if r is not None] + [row.rid for rows in groups for row in rows]
    return ParsedRequest(groups=groups, single=single and len(groups[0]) == 1, rids=rids)


def _n_of(sp: dict) -> int:
    n = sp.get("n")
    return 1 if n is None or n < 1 else n


def _sampling_values(sp: dict, prompt_len: int, limits: Limits) -> tuple[float, float, int, int]:
    """(temperature, top_p, top_k, max_new_tokens) of one sampling_params, checked."""
    for key, neutral in _NEUTRAL_SAMPLING_VALUES.items():
        v = sp.get(key)
        if v is not None and v != neutral:
            raise reject(f"sampling_params.{key}={_preview(v)!r} is not supported by this server")
    temperature, top_p = _float(sp, "temperature", 1.0), _float(sp, "top_p", 1.0)
    top_k = sp["top_k"] if sp.get("top_k") is not None else -1
    max_new = sp["max_new_tokens"] if sp.get("max_new_tokens") is not None else DEFAULT_MAX_NEW_TOKENS
    seed = sp.get("sampling_seed")
    if not math.isfinite(temperature) or temperature < 0:
        raise reject(f"temperature must be a non-negative finite number, got {sp['temperature']}.")
    if not 0.0 < top_p <= 1.0:
        raise reject(f"top_p must be in (0, 1], got {sp['top_p']}.")
    if top_k != -1 and top_k < 1:
        raise reject(f"top_k must be -1 (disable) or at least 1, got {top_k}.")
    if max_new < 0:
        raise reject(f"max_new_tokens must be at least 0, got {max_new}.")
    if seed is not None and not protocol.I64_MIN <= seed <= protocol.I64_MAX:
        raise reject(f"sampling_seed must be in [-2**63, 2**63 - 1], got {seed}.")
    _check_context(prompt_len, max_new, limits.context_length)
    if temperature < 1e-6:
        temperature, top_k = 0.0, 1
    return temperature, top_p, TOP_K_ALL if top_k == -1 else min(top_k, TOP_K_ALL), max_new


def _float(sp: dict, key: str, default: float) -> float:
    v = sp.get(key)
    try:
        return default if v is None else float(v)
    except OverflowError:  # an integer beyond float range (JSON allows it)
        raise reject(f"sampling_params.{key}={_preview(v)} is out of range.") from None


def _check_context(prompt_len: int, max_new: int, context_length: int) -> None:
    if prompt_len >= context_length + 1:
        raise reject(f"The input ({prompt_len} tokens) is longer than the model's context length ({context_length} tokens).")
    if prompt_len + max_new > context_length:
        raise reject(
            f"Requested token count exceeds the model's maximum context length of {context_length} tokens. "
            f"You requested a total of {prompt_len + max_new} tokens: {prompt_len} tokens from the input messages "
            f"and {max_new} tokens for the completion. Please reduce the number of tokens in the input messages or the "
            "completion to fit within the limit."
        )


def _rows_for_prompt(prompt: list[int], sp: dict, n: int, return_logprob: bool, start: int, rid: str | None, limits: Limits) -> list[Row]:
    temperature, top_p, top_k, max_new = _sampling_values(sp, len(prompt), limits)
    if not -1 <= start < len(prompt):
        raise reject(f"logprob_start_len ({start}) must be -1 or smaller than the prompt length ({len(prompt)})")
    stops = frozenset(sp.get("stop_token_ids") or ()) | (frozenset() if sp.get("ignore_eos") else limits.eos_ids)
    prompt_ids = tuple(prompt)  # shared by the n rows
    seed = sp.get("sampling_seed")
    skip = sp.get("skip_special_tokens")
    rows = []
    for j in range(n):
        spec = SequenceSpec(
            prompt_ids=prompt_ids,
            max_new_tokens=max_new,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            stop_token_ids=stops,
            seed=seed_for_copy(seed, j) if seed is not None else int.from_bytes(os.urandom(8), "little", signed=True),
            input_logprobs_from=start if return_logprob else -1,
        )
        row_rid = uuid.uuid4().hex if rid is None else (f"{rid}_{j}" if n > 1 else rid)
        rows.append(Row(spec=spec, rid=row_rid, return_logprob=return_logprob, skip_special_tokens=True if skip is None else skip))
    return rows
