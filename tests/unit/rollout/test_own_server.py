"""The own SGLang-protocol server over HTTP: outputs against HF, the protocol against
SGLang's contract, weight updates, errors and control routes."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from megatron_hpt.rollout import weight_transport
from rollout_testlib import get, hf_greedy, model_with, perturbed_weights, post, recompute_logprobs
from server_testlib import ServerProcess, in_thread, wait_until

PROMPTS = [[1, 40, 50, 60], [5, 6, 7, 8, 9, 10, 11, 12], [300, 2, 17]]


@pytest.fixture(scope="module")
def weight_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("weights_sync")


@pytest.fixture(scope="module")
def url(tiny_model_dir, weight_dir, tmp_path_factory):
    server = ServerProcess(tiny_model_dir, "--weight-dir", str(weight_dir), log_path=tmp_path_factory.mktemp("own_server") / "server.log")
    yield server.url
    server.stop()


def generate(url, contract, body):
    status, reply = post(url, "/generate", body)
    assert status == 200, reply
    contract.check_reply(reply)
    return reply


def test_greedy_equals_hf_generate_and_logprobs_equal_trainer_recomputation(url, contract, hf_model):
    body = {"input_ids": PROMPTS, "sampling_params": {"temperature": 0, "max_new_tokens": 24}, "return_logprob": True}
    reply = generate(url, contract, body)
    assert [r["meta_info"]["prompt_tokens"] for r in reply] == [len(p) for p in PROMPTS]
    for p, r in zip(PROMPTS, reply):
        assert r["output_ids"] == hf_greedy(hf_model, p, 24)
        lps = [e[0] for e in r["meta_info"]["output_token_logprobs"]]
        assert [e[1] for e in r["meta_info"]["output_token_logprobs"]] == r["output_ids"]
        assert all(e[2] is None for e in r["meta_info"]["output_token_logprobs"])
        assert torch.allclose(torch.tensor(lps), recompute_logprobs(hf_model, p, r["output_ids"], 1.0), atol=1e-4)
        assert r["meta_info"]["finish_reason"] == {"type": "length", "length": 24}


@pytest.mark.parametrize("temperature", [0.6, 1.0, 1.5])
def test_sampled_logprobs_are_log_softmax_over_full_vocab(url, contract, hf_model, temperature):
    sp = {"temperature": temperature, "top_p": 0.9, "top_k": 40, "max_new_tokens": 20, "sampling_seed": 11}
    r = generate(url, contract, {"input_ids": PROMPTS[0], "sampling_params": sp, "return_logprob": True})
    lps = torch.tensor([e[0] for e in r["meta_info"]["output_token_logprobs"]])
    assert torch.allclose(lps, recompute_logprobs(hf_model, PROMPTS[0], r["output_ids"], temperature), atol=1e-4)


def test_input_token_logprobs(url, contract, hf_model):
    body = {"input_ids": PROMPTS[1], "sampling_params": {"temperature": 0, "max_new_tokens": 1}, "return_logprob": True, "logprob_start_len": 0}
    r = generate(url, contract, body)
    entries = r["meta_info"]["input_token_logprobs"]
    assert entries[0] == [None, PROMPTS[1][0], None]
    ref = recompute_logprobs(hf_model, PROMPTS[1][:1], PROMPTS[1][1:], 1.0)
    assert torch.allclose(torch.tensor([e[0] for e in entries[1:]]), ref, atol=1e-4)


def test_n_samples_come_back_prompt_major_and_follow_their_seeds(url, contract):
    seeds = [[3, 4, 5], [6, 7, 8]]
    sps = [{"temperature": 1.0, "max_new_tokens": 12, "sampling_seed": s} for row in seeds for s in row]
    prompts = [PROMPTS[0]] * 3 + [PROMPTS[1]] * 3
    batched = generate(url, contract, {"input_ids": prompts, "sampling_params": sps})
    assert [r["meta_info"]["prompt_tokens"] for r in batched] == [4, 4, 4, 8, 8, 8]
    for k, (p, sp) in enumerate(zip(prompts, sps)):
        alone = generate(url, contract, {"input_ids": p, "sampling_params": sp})
        assert alone["output_ids"] == batched[k]["output_ids"]
    # n > 1 with one seed: prompt-major too, and the n copies differ.
    reply = generate(url, contract, {"input_ids": PROMPTS[:2], "sampling_params": {"n": 3, "temperature": 1.0, "max_new_tokens": 12, "sampling_seed": 9}})
    assert [r["meta_info"]["prompt_tokens"] for r in reply] == [4, 4, 4, 8, 8, 8]
    assert len({tuple(r["output_ids"]) for r in reply[:3]}) == 3


def test_same_seed_same_sample_different_seed_different(url, contract):
    def sample(seed):
        sp = {"temperature": 1.0, "max_new_tokens": 16, "sampling_seed": seed}
        return generate(url, contract, {"input_ids": PROMPTS[2], "sampling_params": sp})["output_ids"]

    assert sample(123) == sample(123)
    assert len({tuple(sample(s)) for s in (1, 2, 3, 4)}) == 4


def test_stop_token_ends_with_it_matched(url, contract, hf_model):
    greedy = hf_greedy(hf_model, PROMPTS[0], 10)
    stop = greedy[3]
    sp = {"temperature": 0, "max_new_tokens": 10, "stop_token_ids": [stop]}
    r = generate(url, contract, {"input_ids": PROMPTS[0], "sampling_params": sp, "return_logprob": True})
    assert r["output_ids"] == greedy[: greedy.index(stop) + 1]
    assert r["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
    assert r["meta_info"]["completion_tokens"] == len(r["output_ids"])


BAD_REQUESTS = [
    ("unknown sampling key", {"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 2, "bogus": 1}}, "contract"),
    ("wrong type temperature", {"input_ids": [1, 2], "sampling_params": {"temperature": "hot"}}, "contract"),
    ("wrong type seed", {"input_ids": [1, 2], "sampling_params": {"sampling_seed": 1.5}}, "contract"),
    ("wrong type input_ids", {"input_ids": "abc", "sampling_params": {}}, "validation"),
    ("float ids", {"input_ids": [1.5, 2], "sampling_params": {}}, "validation"),
    ("prompt over context", {"input_ids": [1] * 1100, "sampling_params": {"max_new_tokens": 1}}, "request"),
    ("prompt + response over context", {"input_ids": [1] * 1000, "sampling_params": {"max_new_tokens": 100}}, "request"),
    ("out-of-vocabulary id", {"input_ids": [1, 600], "sampling_params": {}}, "request"),
    ("negative id", {"input_ids": [[1, 2], [-3]], "sampling_params": {}}, "request"),
    ("top_p 0", {"input_ids": [1, 2], "sampling_params": {"top_p": 0}}, "request"),
    ("top_k 0", {"input_ids": [1, 2], "sampling_params": {"top_k": 0}}, "request"),
    ("negative max_new_tokens", {"input_ids": [1, 2], "sampling_params": {"max_new_tokens": -1}}, "request"),
    ("no input", {"sampling_params": {}}, "request"),
    ("empty input", {"input_ids": [], "sampling_params": {}}, "request"),
    ("unsupported feature", {"input_ids": [1, 2], "sampling_params": {"stop": ["x"]}}, "request"),
    ("params list length", {"input_ids": [[1, 2], [3]], "sampling_params": [{}]}, "request"),
]


@pytest.mark.parametrize("name,body,shape", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_requests_get_400_in_sglang_error_shapes(url, sglang_api, name, body, shape):
    status, reply = post(url, "/generate", body)
    assert status == 400, reply
    if shape == "validation":
        assert set(reply) == {"object", "message", "type", "param", "code"} and reply["object"] == "error" and reply["code"] == 400
    elif shape == "contract":
        assert set(reply) == {"error"} and isinstance(reply["error"], str)
        with pytest.raises(sglang_api.JsonContractError, match=reply["error"].split(",")[0].replace("`", ".")):
            sglang_api.GenerateRequest.from_json_value(body)
    else:
        assert set(reply) == {"error"} and set(reply["error"]) == {"message"}
    assert get(url, "/health")[0] == 200  # the server survives every one of them


def test_unknown_top_level_keys_are_ignored(url, contract):
    generate(url, contract, {"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 1}, "zzz": 3})
    # A body over 1 MB is decoded and checked off the event loop, same answer.
    generate(url, contract, {"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 1}, "zzz": "x" * (2 << 20)})


def test_update_weights_from_disk_changes_outputs_to_the_new_weights(url, contract, hf_model, tiny_model_dir, weight_dir):
    new = perturbed_weights(hf_model)
    new_dir = weight_transport.write_safetensors_dir(new.items(), weight_dir / "step1", config_from=tiny_model_dir)
    new_model = model_with(tiny_model_dir, new)
    body = {"input_ids": PROMPTS, "sampling_params": {"temperature": 0, "max_new_tokens": 16}, "return_logprob": True}
    before = generate(url, contract, body)

    status, reply = post(url, "/update_weights_from_disk", {"model_path": str(new_dir), "weight_version": "step1"})
    assert status == 200 and reply["success"] is True and reply["num_paused_requests"] == 0
    after = generate(url, contract, body)
    try:
        assert [r["output_ids"] for r in after] != [r["output_ids"] for r in before]
        for p, r in zip(PROMPTS, after):
            assert r["output_ids"] == hf_greedy(new_model, p, 16)
            lps = torch.tensor([e[0] for e in r["meta_info"]["output_token_logprobs"]])
            assert torch.allclose(lps, recompute_logprobs(new_model, p, r["output_ids"], 1.0), atol=1e-4)
            assert r["meta_info"]["weight_version"] == "step1"
        assert get(url, "/model_info")[1]["weight_version"] == "step1"
    finally:
        status, _ = post(url, "/update_weights_from_disk", {"model_path": str(tiny_model_dir), "weight_version": "default"})
        assert status == 200
    restored = generate(url, contract, body)
    assert [r["output_ids"] for r in restored] == [r["output_ids"] for r in before]


def test_update_weights_from_missing_path_is_400_and_keeps_weights(url, contract):
    body = {"input_ids": PROMPTS[0], "sampling_params": {"temperature": 0, "max_new_tokens": 8}}
    before = generate(url, contract, body)["output_ids"]
    status, reply = post(url, "/update_weights_from_disk", {"model_path": "/nonexistent/weights", "weight_version": "x"})
    assert status == 400
    assert set(reply) == {"success", "message", "num_paused_requests"} and reply["success"] is False
    assert generate(url, contract, body)["output_ids"] == before
    assert get(url, "/model_info")[1]["weight_version"] != "x"


def test_distributed_update_outside_a_session_is_refused(url):
    status, reply = post(url, "/update_weights_from_distributed", {"names": ["lm_head.weight"], "dtypes": ["float32"], "shapes": [[512, 128]]})
    assert status == 400 and reply["success"] is False and "begin_weight_update" in reply["message"]


def test_info_routes(url):
    status, info = get(url, "/model_info")
    assert status == 200 and info["architectures"] == ["Qwen2ForCausalLM"] and info["is_generation"] is True
    status, info = get(url, "/server_info")
    assert status == 200 and info["context_length"] == 1024 and info["vocab_size"] == 512
    assert get(url, "/health_generate")[0] == 200
    status, text = post(url, "/flush_cache", {})
    assert status == 200 and text.startswith("Cache flushed")


def test_release_and_resume_memory(url, contract):
    body = {"input_ids": PROMPTS[0], "sampling_params": {"temperature": 0, "max_new_tokens": 4}}
    before = generate(url, contract, body)["output_ids"]
    assert post(url, "/release_memory_occupation", {})[0] == 200
    status, reply = post(url, "/generate", body)
    assert status == 400 and "resume_memory_occupation" in reply["error"]["message"]
    assert post(url, "/resume_memory_occupation", {})[0] == 200
    assert generate(url, contract, body)["output_ids"] == before


def test_abort_all_and_pause_continue(url, contract):
    # A request held by an in-place pause is aborted by abort_all and answered while the
    # server is still paused (nothing depends on speed or on what the model samples).
    long_body = {"input_ids": [PROMPTS[0]] * 4, "sampling_params": {"temperature": 1.0, "max_new_tokens": 1000, "ignore_eos": True}}
    assert post(url, "/pause_generation", {"mode": "in_place"})[0] == 200
    t, out = in_thread(post, url, "/generate", long_body)
    wait_until(lambda: get(url, "/server_info")[1]["internal_states"][0]["pending_sequences"] == 4, "the request to be queued")
    assert post(url, "/abort_request", {"abort_all": True})[0] == 200
    t.join(timeout=120)
    status, reply = out[0]
    assert status == 200
    contract.check_reply(reply)
    assert [r["meta_info"]["finish_reason"]["type"] for r in reply] == ["abort"] * 4
    assert all(r["output_ids"] == [] for r in reply)
    assert post(url, "/continue_generation", {})[0] == 200

    # in_place pause: the request waits, then finishes normally after continue (EOS off:
    # exactly max_new_tokens, whatever the random model samples).
    assert post(url, "/pause_generation", {"mode": "in_place"})[0] == 200
    body = {"input_ids": PROMPTS[0], "sampling_params": {"max_new_tokens": 3, "ignore_eos": True}}
    t, out = in_thread(post, url, "/generate", body)
    wait_until(lambda: get(url, "/server_info")[1]["internal_states"][0]["pending_sequences"] == 1, "the request to be queued")
    assert not out, "a paused server must not answer"
    assert post(url, "/continue_generation", {})[0] == 200
    t.join(timeout=120)
    status, reply = out[0]
    assert status == 200 and reply["meta_info"]["finish_reason"] == {"type": "length", "length": 3}
