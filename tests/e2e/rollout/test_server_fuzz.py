"""Random malformed and oversized bodies on every route of the own server (a seeded RNG:
the same bodies every run). Every one gets an answer in SGLang's shapes (never a 500 or
a dropped connection); afterwards the server still generates exactly what the model
says, reports no stuck worker, and its memory grew by a bounded amount."""

from __future__ import annotations

import json
import math
import random

import pytest

from megatron_hpt.rollout.server.routes import ROUTES
from rollout_testlib import get, hf_greedy, post
from server_testlib import ServerProcess, free_port

BODIES_PER_ROUTE = 200
MAX_BODY_MB = 1
RSS_GROWTH_LIMIT = 300 << 20
"""Generous: the server holds no state per request, so growth is allocator noise."""
PROMPT = [1, 40, 50, 60]

_KEYS = ["input_ids", "text", "rid", "sampling_params", "return_logprob", "logprob_start_len", "stream", "n",
         "max_new_tokens", "temperature", "top_p", "top_k", "sampling_seed", "stop_token_ids", "ignore_eos",
         "model_path", "weight_version", "abort_all_requests", "master_address", "master_port", "rank_offset",
         "world_size", "group_name", "backend", "names", "dtypes", "shapes", "load_format", "mode", "abort_all"]  # fmt: skip


def _valid_bodies(weight_dir: str, dead_port: int) -> dict[str, dict]:
    """A well-formed body per route (or one field off), for the mutations to start from."""
    return {
        "/generate": {"input_ids": [PROMPT, [5, 6]], "rid": ["a", "b"], "return_logprob": True, "logprob_start_len": 0,
                      "sampling_params": {"n": 2, "max_new_tokens": 4, "temperature": 0.7, "top_p": 0.9, "top_k": 20, "sampling_seed": 3}},
        "/update_weights_from_disk": {"model_path": weight_dir, "weight_version": "fuzz", "abort_all_requests": False},
        # world_size 1 is one field off (each rendezvous with the dead port costs its
        # timeout): only mutations that fix it reach the rendezvous.
        "/init_weights_update_group": {"master_address": "127.0.0.1", "master_port": dead_port, "rank_offset": 1, "world_size": 1,
                                       "group_name": "fuzz", "backend": "gloo"},
        "/update_weights_from_distributed": {"names": ["lm_head.weight"], "dtypes": ["float32"], "shapes": [[512, 128]],
                                             "group_name": "fuzz", "load_format": "flattened_bucket", "weight_version": "fuzz"},
        "/destroy_weights_update_group": {"group_name": "fuzz"},
        "/pause_generation": {"mode": "in_place"},
        "/abort_request": {"rid": "a"},
    }  # fmt: skip


def _random_value(rng: random.Random, depth: int = 0):
    kind = rng.randrange(12 if depth < 3 else 8)
    if kind == 0:
        return None
    if kind == 1:
        return rng.random() < 0.5
    if kind == 2:
        return rng.randint(-5, 600)
    if kind == 3:
        return rng.choice([2**63, -(2**63) - 1, 10**30, 2**64, -1, 0, 10**400])
    if kind == 4:
        return rng.choice([math.nan, math.inf, -math.inf, 1e308, -0.0, 0.5, 1e-320])
    if kind == 5:
        return "".join(rng.choice("ab/._-\u00e9\u4e2d\x00 ") for _ in range(rng.randint(0, 12)))
    if kind == 6:
        return rng.choice(["", "/", "../../etc", "/proc/self", "nccl", "in_place", "abort", "float32", "x" * rng.randint(100, 5000)])
    if kind == 7:
        return [rng.randint(-3, 700) for _ in range(rng.randint(0, 20))]
    if kind == 8:
        return [_random_value(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    if kind == 9:
        return {rng.choice(_KEYS): _random_value(rng, depth + 1) for _ in range(rng.randint(0, 4))}
    if kind == 10:
        return [[rng.randint(0, 600) for _ in range(rng.randint(0, 4))] for _ in range(rng.randint(0, 3))]
    return {rng.choice(_KEYS): _random_value(rng, depth + 1)}


def _mutate(rng: random.Random, body: dict) -> dict:
    out = json.loads(json.dumps(body))
    for _ in range(rng.randint(1, 3)):
        target = out["sampling_params"] if "sampling_params" in out and isinstance(out["sampling_params"], dict) and rng.random() < 0.4 else out
        action = rng.randrange(3)
        key = rng.choice(list(target) or _KEYS) if action < 2 else rng.choice(_KEYS)
        if action == 0:
            target.pop(key, None)
        else:
            target[key] = _random_value(rng)
    return out


_RAW = [b"", b"{", b"null", b"[1, 2", b'{"input_ids": [1, 2]', b"\xff\xfe\x00", b"NaN", b'"text"', b"[" * 50_000 + b"]" * 50_000,
        b'{"a": ' * 20_000 + b"1" + b"}" * 20_000, b'{"input_ids": [[[[[[1]]]]]]}']  # fmt: skip


def _bodies(rng: random.Random, valid: dict | None) -> list[bytes]:
    """BODIES_PER_ROUTE bodies: random JSON values, mutations of a valid body, broken
    JSON, and bodies over the size limit."""
    out: list[bytes] = []
    for i in range(BODIES_PER_ROUTE):
        pick = i % 10
        if pick < 3 or valid is None and pick < 7:
            out.append(json.dumps(_random_value(rng)).encode())
        elif pick < 7:
            out.append(json.dumps(_mutate(rng, valid)).encode())
        elif pick < 9:
            out.append(rng.choice(_RAW) if rng.random() < 0.7 else rng.randbytes(rng.randint(1, 200)))
        else:
            filler = "x" * (MAX_BODY_MB << 20)
            out.append(json.dumps({**(valid or {}), rng.choice(_KEYS): filler}).encode())
    return out


def _is_error_shape(body) -> bool:
    if not isinstance(body, dict):
        return False
    if body.get("object") == "error" and set(body) == {"object", "message", "type", "param", "code"}:
        return True
    if set(body) == {"error"}:
        return isinstance(body["error"], str) or (isinstance(body["error"], dict) and set(body["error"]) == {"message"})
    return body.get("success") is False and isinstance(body.get("message"), str)


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    weight_dir = tmp_path_factory.mktemp("fuzz_weights")
    flags = ["--weight-dir", str(weight_dir), "--max-body-mb", str(MAX_BODY_MB), "--max-sequences-per-request", "16",
             "--weight-group-timeout-s", "0.2", "--request-deadline-s", "60"]  # fmt: skip
    s = ServerProcess(tiny_model_dir, *flags, log_path=tmp_path_factory.mktemp("fuzz") / "server.log")
    s.weight_dir = weight_dir
    yield s
    s.stop()


def _reset(url: str) -> None:
    for path in ("/continue_generation", "/resume_memory_occupation", "/end_weight_update"):
        assert post(url, path, {})[0] == 200


def test_random_bodies_on_every_route_leave_the_server_serving(server, hf_model):
    greedy = {"input_ids": PROMPT, "sampling_params": {"temperature": 0, "max_new_tokens": 12}}
    assert post(server.url, "/generate", greedy)[1]["output_ids"] == hf_greedy(hf_model, PROMPT, 12)
    rss_before = server.rss_bytes()
    valid = _valid_bodies(str(server.weight_dir), free_port())
    sent = 0
    for method, path, _ in ROUTES:
        rng = random.Random(f"fuzz-{path}")
        for body in _bodies(rng, valid.get(path)):
            status, reply = post(server.url, path, body, timeout=120, method="POST" if method == "*" else method)
            assert status in (200, 400, 413, 503), (path, status, reply, body[:300])
            assert status == 200 or _is_error_shape(reply), (path, status, reply, body[:300])
            sent += 1
        _reset(server.url)
    assert sent == BODIES_PER_ROUTE * len(ROUTES)

    status, reply = post(server.url, "/generate", greedy)
    assert status == 200 and reply["output_ids"] == hf_greedy(hf_model, PROMPT, 12)
    assert get(server.url, "/health_generate")[0] == 200
    state = get(server.url, "/server_info")[1]["internal_states"][0]
    assert state["pending_sequences"] == 0 and state["worker_problem"] is None
    growth = server.rss_bytes() - rss_before
    assert growth < RSS_GROWTH_LIMIT, f"RSS grew by {growth >> 20} MiB"
