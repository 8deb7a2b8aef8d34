"""The SGLang HTTP protocol subset the client sends and the project's server answers.

Facts from SGLang 0.5.23 (its JSON contract ``sglang/api/v1/api_types.py`` and a live
server, DESIGN.md §3): /generate takes ``input_ids`` (or ``text``), one prompt or a
batch, ``sampling_params`` (one object or one per prompt), ``return_logprob`` and
``logprob_start_len``; with n > 1 or a batch the reply is a list ordered prompt-major
(p0s0, p0s1, p1s0, ...). ``meta_info.output_token_logprobs`` holds
``[logprob, token_id, null]`` triples. ``finish_reason`` is ``{"type": "stop",
"matched": id}``, ``{"type": "length", "length": n}`` or ``{"type": "abort",
"message": ...}``. Errors come in three body shapes, by where they are caught:

- request validation (a top-level field of the wrong type, a body that is not JSON):
  ``{"object": "error", "message", "type": "Bad Request", "param": null, "code": 400}``;
- the JSON contract gate (unknown sampling key, wrong sampling value type):
  ``{"error": "<serde message>"}``;
- request checks (bad values, prompt too long): ``{"error": {"message": ...}}``.
"""

from __future__ import annotations

from typing import Any

from megatron_hpt.rollout.engine import Completion

SAMPLING_PARAM_KINDS: dict[str, str] = {
    "max_new_tokens": "i64",
    "stop": "str_or_list",
    "stop_token_ids": "i64_list",
    "stop_regex": "str_or_list",
    "temperature": "f64",
    "top_p": "f64",
    "top_k": "i64",
    "min_p": "f64",
    "frequency_penalty": "f64",
    "presence_penalty": "f64",
    "repetition_penalty": "f64",
    "min_new_tokens": "i64",
    "n": "i64",
    "json_schema": "str",
    "regex": "str",
    "ebnf": "str",
    "structural_tag": "str",
    "ignore_eos": "bool",
    "skip_special_tokens": "bool",
    "spaces_between_special_tokens": "bool",
    "no_stop_trim": "bool",
    "stream_interval": "i64",
    "logit_bias": "f64_map",
    "sampling_seed": "i64",
    "custom_params": "any",
    "beam_width": "i64",
    "watermark": "map",
    "choice": "str_list",
}
"""Every key SGLang 0.5.23 accepts in sampling_params (in its order) and its JSON kind."""

I64_MIN, I64_MAX = -(2**63), 2**63 - 1


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def describe_json_value(v: Any) -> str:
    """How serde names an unexpected JSON value (SGLang's contract messages use it)."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return f"boolean `{'true' if v else 'false'}`"
    if isinstance(v, int):
        return f"integer `{v}`"
    if isinstance(v, float):
        return f"floating point `{v}`"
    if isinstance(v, str):
        return f'string "{v}"'
    if isinstance(v, list):
        return "sequence"
    if isinstance(v, dict):
        return "map"
    return type(v).__name__


def _invalid(v: Any, expected: str) -> str:
    return f"invalid type: {describe_json_value(v)}, expected {expected}"


def sampling_params_contract_error(params: Any) -> str | None:
    """The contract gate's message for one sampling_params object, or None when it passes."""
    if not isinstance(params, dict):
        return _invalid(params, "struct SamplingParams")
    for key, value in params.items():
        kind = SAMPLING_PARAM_KINDS.get(key)
        if kind is None:
            listed = ", ".join(f"`{f}`" for f in SAMPLING_PARAM_KINDS)
            return f"unknown field `{key}`, expected one of {listed}"
        if value is None or kind == "any":
            continue
        if kind == "i64" and not _is_int(value):
            return _invalid(value, "i64")
        if kind == "f64" and not _is_number(value):
            return _invalid(value, "f64")
        if kind == "bool" and not isinstance(value, bool):
            return _invalid(value, "a boolean")
        if kind == "str" and not isinstance(value, str):
            return _invalid(value, "a string")
        if kind == "map" and not isinstance(value, dict):
            return _invalid(value, "a map")
        if kind == "str_or_list":
            items = value if isinstance(value, list) else [value]
            bad = [e for e in items if not isinstance(e, str)]
            if bad:
                return _invalid(bad[0], "a string" if isinstance(value, list) else "a value or an array of values for StringOrList")
        if kind in ("i64_list", "str_list"):
            if not isinstance(value, list):
                return _invalid(value, "a sequence")
            want_int = kind == "i64_list"
            bad = [e for e in value if not (_is_int(e) if want_int else isinstance(e, str))]
            if bad:
                return _invalid(bad[0], "i64" if want_int else "a string")
        if kind == "f64_map":
            if not isinstance(value, dict):
                return _invalid(value, "a map")
            bad = [e for e in value.values() if not _is_number(e)]
            if bad:
                return _invalid(bad[0], "f64")
    return None


def validation_error_body(field: str, message: str, value: Any) -> dict:
    """Body of a request-validation failure (SGLang's first error shape)."""
    detail = {"type": "value_error", "loc": ("body", field), "msg": f"Value error, {message}", "input": value}
    return {
        "object": "error",
        "message": f"1 validation error:\n  {detail}",
        "type": "Bad Request",
        "param": None,
        "code": 400,
    }


def contract_error_body(message: str) -> dict:
    """Body of a JSON-contract failure (SGLang's second error shape)."""
    return {"error": message}


def request_error_body(message: str) -> dict:
    """Body of a request-check failure (SGLang's third error shape)."""
    return {"error": {"message": message}}


def error_message(body: Any) -> str:
    """The human-readable message of any of the three error shapes (or the raw body)."""
    if isinstance(body, dict):
        if isinstance(body.get("error"), dict):
            return str(body["error"].get("message", body))
        if isinstance(body.get("error"), str):
            return body["error"]
        if "message" in body:
            return str(body["message"])
    return str(body)


def finish_stop(matched: int | str | None) -> dict:
    return {"type": "stop", "matched": matched}


def finish_length(length: int) -> dict:
    return {"type": "length", "length": length}


def finish_abort(message: str) -> dict:
    return {"type": "abort", "message": message}


def build_generate_payload(
    prompts: list[list[int]],
    sampling_params: list[dict],
    return_logprob: bool = True,
) -> dict:
    """A batched /generate body: one row per (prompt, sample), each with its own sampling
    params (so each sample carries its own seed). Rows stay in the given order."""
    if len(prompts) != len(sampling_params):
        raise ValueError(f"{len(prompts)} prompts but {len(sampling_params)} sampling_params")
    return {"input_ids": prompts, "sampling_params": sampling_params, "return_logprob": return_logprob}


def completion_from_reply(item: Any) -> Completion:
    """One /generate reply item (a dict) as a Completion; raises ValueError on a malformed one."""
    if not isinstance(item, dict) or not isinstance(item.get("meta_info"), dict):
        raise ValueError(f"a /generate reply item must be an object with meta_info, got {str(item)[:200]}")
    meta = item["meta_info"]
    output_ids = item.get("output_ids")
    entries = meta.get("output_token_logprobs") or []
    if output_ids is None:
        output_ids = [int(e[1]) for e in entries]
    if entries and [int(e[1]) for e in entries] != list(output_ids):
        raise ValueError("meta_info.output_token_logprobs token ids differ from output_ids")
    finish = meta.get("finish_reason") or {}
    finish_type = finish.get("type", "abort") if isinstance(finish, dict) else str(finish)
    keep = ("id", "prompt_tokens", "completion_tokens", "weight_version", "e2e_latency", "cached_tokens")
    extra = {k: meta[k] for k in keep if k in meta}
    extra["finish_reason"] = finish
    return Completion(
        output_ids=[int(t) for t in output_ids],
        output_logprobs=[float(e[0]) for e in entries],
        finish_reason=finish_type,
        meta=extra,
    )
