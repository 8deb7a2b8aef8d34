"""The own server under hostile or unlucky use, as a process started with the flags a
launcher passes: malformed requests, missing keys, foreign or partial weights, dead
peers, oversized work, requests past their deadline."""

from __future__ import annotations

import shutil

import pytest
import torch

from megatron_hpt.rollout import weight_transport
from megatron_hpt.rollout.server.routes import ROUTES
from rollout_testlib import get, hf_greedy, model_with, perturbed_weights, post
from server_testlib import ServerProcess, free_port, in_thread, wait_until

KEY = "test-key-0123"
AUTH = {"Authorization": f"Bearer {KEY}"}
PROMPT = [1, 40, 50, 60]
GREEDY = {"input_ids": PROMPT, "sampling_params": {"temperature": 0, "max_new_tokens": 12}}


@pytest.fixture(scope="module")
def weight_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("weights_sync")


@pytest.fixture(scope="module")
def server(tiny_model_dir, weight_dir, tmp_path_factory):
    flags = ["--api-key", KEY, "--launch-token", "launch-42", "--weight-version", "v7", "--weight-dir", str(weight_dir),
             "--max-sequences-per-request", "8", "--max-body-mb", "1"]  # fmt: skip
    s = ServerProcess(tiny_model_dir, *flags, log_path=tmp_path_factory.mktemp("hardening") / "server.log")
    yield s
    s.stop()


def greedy(url: str) -> list[int]:
    status, reply = post(url, "/generate", GREEDY, headers=AUTH, timeout=60)
    assert status == 200, reply
    return reply["output_ids"]


@pytest.mark.parametrize(
    "rid",
    [{"a": 1}, [["a"]], [1], 5, ["x", {"a": 1}]],
    ids=["dict", "nested-list", "list-of-int", "int", "list-with-dict"],
)
def test_a_rid_of_a_wrong_type_is_a_400_and_generation_goes_on(server, hf_model, contract, rid):
    status, reply = post(server.url, "/generate", {"rid": rid, "input_ids": PROMPT, "sampling_params": {"max_new_tokens": 2}}, headers=AUTH)
    assert status == 400
    assert reply["object"] == "error" and "'loc': ('body', 'rid')" in reply["message"]
    status, reply = post(server.url, "/generate", GREEDY, headers=AUTH, timeout=60)
    assert status == 200
    contract.check_reply(reply)
    assert reply["output_ids"] == hf_greedy(hf_model, PROMPT, 12)


def _method(method: str) -> str:
    return "POST" if method == "*" else method


def _call(url: str, method: str, path: str, headers: dict | None) -> int:
    if method == "GET":
        return get(url, path, headers=headers)[0]
    return post(url, path, {}, headers=headers)[0]


def test_every_route_but_health_needs_the_api_key(server):
    open_routes = [(m, p) for m, p, _ in ROUTES if p.startswith("/health")]
    assert {p for _, p in open_routes} == {"/health", "/health_generate"}
    for method, path in open_routes:
        assert _call(server.url, method, path, None) == 200
    for method, path, _ in ROUTES:
        if path.startswith("/health"):
            continue
        m = _method(method)
        for headers in (None, {"Authorization": "Bearer wrong-key"}, {"Authorization": KEY}, {"Authorization": f"Basic {KEY}"}):
            status, body = (get(server.url, path, headers=headers) if m == "GET" else post(server.url, path, {}, headers=headers))
            assert (status, body) == (401, {"error": "Unauthorized"}), (path, headers)
        assert _call(server.url, m, path, AUTH) != 401, path
    # The calls with the key paused and released generation (in ROUTES order, each undone).
    assert greedy(server.url)


def test_launch_token_and_start_weight_version_are_reported(server):
    for path in ("/get_server_info", "/server_info"):
        status, info = get(server.url, path, headers=AUTH)
        assert status == 200 and info["launch_token"] == "launch-42" and info["weight_version"] == "v7"
    assert get(server.url, "/model_info", headers=AUTH)[1]["weight_version"] == "v7"
    status, reply = post(server.url, "/generate", GREEDY, headers=AUTH)
    assert reply["meta_info"]["weight_version"] == "v7"
    assert reply["meta_info"]["weight_versions"] == [{"version": "v7", "start": 0, "end": 12}]


def _update(url: str, path, version: str = "bad") -> tuple[int, dict]:
    return post(url, "/update_weights_from_disk", {"model_path": str(path), "weight_version": version}, headers=AUTH)


def _assert_refused_and_unchanged(url: str, reply_status: int, reply: dict, expected_greedy: list[int], message: str) -> None:
    assert reply_status == 400 and reply["success"] is False and message in reply["message"], reply
    assert set(reply) == {"success", "message", "num_paused_requests"}
    assert greedy(url) == expected_greedy
    assert get(url, "/get_server_info", headers=AUTH)[1]["weight_version"] == "v7"


def test_a_partial_update_is_refused_and_the_weights_stay(server, weight_dir, hf_model, tiny_model_dir):
    before = hf_greedy(hf_model, PROMPT, 12)
    zeroed = {"model.embed_tokens.weight": torch.zeros_like(hf_model.model.embed_tokens.weight)}
    path = weight_transport.write_safetensors_dir(zeroed.items(), weight_dir / "partial", config_from=tiny_model_dir)
    _assert_refused_and_unchanged(server.url, *_update(server.url, path), before, "misses 50 of the model's parameters")

    wrong_shape = {**hf_model.state_dict(), "lm_head.weight": torch.zeros(3, 3)}
    path = weight_transport.write_safetensors_dir(wrong_shape.items(), weight_dir / "wrong_shape", config_from=tiny_model_dir)
    _assert_refused_and_unchanged(server.url, *_update(server.url, path), before, "lm_head.weight: shape (3, 3)")

    unknown = {**hf_model.state_dict(), "model.extra.weight": torch.zeros(2)}
    path = weight_transport.write_safetensors_dir(unknown.items(), weight_dir / "unknown", config_from=tiny_model_dir)
    _assert_refused_and_unchanged(server.url, *_update(server.url, path), before, "unknown parameter names ['model.extra.weight']")


def test_weights_from_outside_the_weight_dir_are_refused(server, weight_dir, hf_model, tiny_model_dir, tmp_path):
    before = hf_greedy(hf_model, PROMPT, 12)
    new = perturbed_weights(hf_model, seed=7)
    outside = weight_transport.write_safetensors_dir(new.items(), tmp_path / "outside", config_from=tiny_model_dir)
    _assert_refused_and_unchanged(server.url, *_update(server.url, outside), before, "outside the folders this server loads weights from")
    (weight_dir / "link").symlink_to(outside, target_is_directory=True)
    _assert_refused_and_unchanged(server.url, *_update(server.url, weight_dir / "link"), before, "outside the folders")
    _assert_refused_and_unchanged(server.url, *_update(server.url, f"{weight_dir}/../{tmp_path.name}/outside"), before, "outside the folders")
    inside_with_linked_file = weight_dir / "linked_file"
    inside_with_linked_file.mkdir()
    (inside_with_linked_file / "model.safetensors").symlink_to(outside / "model.safetensors")
    _assert_refused_and_unchanged(server.url, *_update(server.url, inside_with_linked_file), before, "outside the folders")

    # The same weights inside the weight folder load; the start folder is allowed too.
    inside = shutil.copytree(outside, weight_dir / "step1")
    status, reply = _update(server.url, inside, "step1")
    assert status == 200 and reply["success"] is True
    assert greedy(server.url) == hf_greedy(model_with(tiny_model_dir, new), PROMPT, 12)
    status, reply = _update(server.url, tiny_model_dir, "v7")
    assert status == 200 and greedy(server.url) == before


def _distributed_update(url: str, named: dict[str, torch.Tensor], version: str, bucket_bytes: int = 1 << 16) -> tuple[int, dict]:
    """Opens a gloo group with the server (this process is rank 0), sends ``named`` in
    buckets between begin and end, closes the group; returns end_weight_update's answer."""
    import torch.distributed as dist

    port, name = free_port(), f"test-group-{version}"
    body = {"master_address": "127.0.0.1", "master_port": port, "rank_offset": 1, "world_size": 2, "group_name": name, "backend": "gloo"}
    t, out = in_thread(post, url, "/init_weights_update_group", body, headers=AUTH)
    group = weight_transport.open_update_group(master_address="127.0.0.1", master_port=port, rank=0, world_size=2, group_name=name, backend="gloo", timeout_s=60)
    t.join(timeout=120)
    assert out[0][0] == 200, out
    try:
        assert post(url, "/begin_weight_update", {}, headers=AUTH)[0] == 200
        for bucket in weight_transport.bucket_by_size(named.items(), bucket_bytes):
            body = {"names": [n for n, _ in bucket], "dtypes": [weight_transport.dtype_name(x.dtype) for _, x in bucket],
                    "shapes": [list(x.shape) for _, x in bucket], "group_name": name, "load_format": "flattened_bucket", "weight_version": version}  # fmt: skip
            t, out = in_thread(post, url, "/update_weights_from_distributed", body, headers=AUTH)
            dist.broadcast(weight_transport.flatten_bucket([x for _, x in bucket]), src=0, group=group)
            t.join(timeout=120)
            assert out[0][0] == 200, out
        return post(url, "/end_weight_update", {}, headers=AUTH)
    finally:
        assert post(url, "/destroy_weights_update_group", {"group_name": name}, headers=AUTH)[0] == 200
        weight_transport.close_update_group(group)


def test_a_partial_distributed_update_is_refused_whole(server, hf_model, tiny_model_dir):
    before = hf_greedy(hf_model, PROMPT, 12)
    new = perturbed_weights(hf_model, seed=8)
    half = dict(list(new.items())[: len(new) // 2])
    status, reply = _distributed_update(server.url, half, "d1")
    _assert_refused_and_unchanged(server.url, status, {**reply, "num_paused_requests": 0}, before, "misses")

    status, reply = _distributed_update(server.url, new, "d2")
    assert status == 200 and reply["success"] is True, reply
    assert greedy(server.url) == hf_greedy(model_with(tiny_model_dir, new), PROMPT, 12)
    assert post(server.url, "/generate", GREEDY, headers=AUTH)[1]["meta_info"]["weight_version"] == "d2"
    assert _update(server.url, tiny_model_dir, "v7")[0] == 200


@pytest.mark.parametrize(
    "body, status, message",
    [
        ({"input_ids": PROMPT, "sampling_params": {"n": 9}}, 400, "9 sequences (prompts x n), more than this server takes in one request (8, --max-sequences-per-request)"),
        ({"input_ids": PROMPT, "sampling_params": {"n": 200000}}, 400, "--max-sequences-per-request"),
        ({"input_ids": [PROMPT] * 9, "sampling_params": {"max_new_tokens": 1}}, 400, "asks for 9 prompts"),
        ({"text": ["a b"] * 9, "sampling_params": {"max_new_tokens": 1}}, 400, "asks for 9 prompts"),
        ({"input_ids": [PROMPT] * 3, "sampling_params": {"n": 3, "max_new_tokens": 1}}, 400, "asks for 9 sequences"),
        ({"input_ids": PROMPT, "sampling_params": {"max_new_tokens": 10**30}}, 400, "exceeds the model's maximum context length"),
        ({"input_ids": PROMPT, "sampling_params": {"top_p": 10**400}}, 400, "out of range"),
        ({"input_ids": [1] * 400_000, "sampling_params": {}}, 413, "larger than 1 MB (--max-body-mb)"),
    ],
    ids=["n", "n-huge", "prompts", "texts", "prompts-x-n", "max-new-tokens", "float-overflow", "body"],
)
def test_sizes_are_bounded(server, body, status, message):
    got, reply = post(server.url, "/generate", body, headers=AUTH)
    assert got == status and set(reply) == {"error"} and message in reply["error"]["message"], reply
    ok, reply = post(server.url, "/generate", {"input_ids": [PROMPT, PROMPT], "sampling_params": {"n": 4, "max_new_tokens": 1}}, headers=AUTH)
    assert ok == 200 and len(reply) == 8


def test_a_request_past_its_deadline_is_aborted_with_a_503(tiny_model_dir, tmp_path, hf_model):
    s = ServerProcess(tiny_model_dir, "--request-deadline-s", "1", log_path=tmp_path / "server.log")
    try:
        # Paused in place, the request cannot finish: the deadline must answer it.
        assert post(s.url, "/pause_generation", {"mode": "in_place"})[0] == 200
        status, reply = post(s.url, "/generate", GREEDY, timeout=120)
        assert status == 503 and "deadline of 1 s (--request-deadline-s)" in reply["error"]["message"]
        wait_until(lambda: get(s.url, "/server_info")[1]["internal_states"][0]["pending_sequences"] == 0, "the expired sequence to be dropped")
        assert post(s.url, "/continue_generation", {})[0] == 200
        status, reply = post(s.url, "/generate", GREEDY)
        assert status == 200 and reply["output_ids"] == hf_greedy(hf_model, PROMPT, 12)
    finally:
        s.stop()


def test_group_inits_to_a_dead_address_do_not_hold_up_sigterm(tiny_model_dir, tmp_path):
    s = ServerProcess(tiny_model_dir, log_path=tmp_path / "server.log")
    try:
        dead_port = free_port()  # nothing listens there: the rendezvous waits for its timeout
        body = {"master_address": "127.0.0.1", "master_port": dead_port, "rank_offset": 1, "world_size": 2, "backend": "gloo"}
        calls = [in_thread(post, s.url, "/init_weights_update_group", {**body, "group_name": f"g{i}"}, timeout=600) for i in range(6)]
        wait_until(lambda: get(s.url, "/server_info")[1]["internal_states"][0]["weight_group_inits"] == 6, "six group inits in progress")
        assert get(s.url, "/health_generate")[0] == 200  # the server still serves meanwhile
        assert s.terminate_and_wait(timeout_s=60) == 0, "the server must exit on SIGTERM"
        for t, _ in calls:
            t.join(timeout=60)
    finally:
        s.stop()
