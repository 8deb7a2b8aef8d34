"""The RolloutEngine over HTTP: seeds, prompt checks, weight sync (disk and
torch.distributed per pipeline stage), attach mode, and failover when a server dies
in the middle of a batch."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from megatron_hpt.rollout import RolloutConfig, RolloutError, SamplingParams, SGLangEngine, sample_seed, weight_transport
from megatron_hpt.rollout.launcher import SGLangNotInstalled, launch_servers
from megatron_hpt.rollout.sglang_engine import DistributedWeightSender
from rollout_testlib import hf_greedy, model_with, own_engine_config, perturbed_weights, recompute_logprobs

PROMPTS = [[1, 40 + i, 50, 60 + 2 * i] for i in range(6)]


def test_config_checks():
    with pytest.raises(ValueError, match="urls"):
        RolloutConfig(engine="attach")
    with pytest.raises(ValueError, match="tp_size"):
        RolloutConfig(engine="own", tp_size=2)
    with pytest.raises(ValueError, match="top_p"):
        RolloutConfig(top_p=0.0)
    cfg = RolloutConfig()
    assert (cfg.n, cfg.temperature, cfg.engine) == (8, 1.0, "own")
    assert cfg.sampling_params().to_sglang() == {"temperature": 1.0, "top_p": 1.0, "top_k": -1, "max_new_tokens": 8192}


def test_sample_seeds_are_distinct_and_stable():
    seeds = {sample_seed(0, i, j) for i in range(50) for j in range(8)}
    assert len(seeds) == 400 and all(0 <= s < 2**63 for s in seeds)
    assert sample_seed(0, 3, 1) == sample_seed(0, 3, 1) != sample_seed(1, 3, 1)


def test_missing_sglang_says_how_to_install(tiny_model_dir):
    cfg = RolloutConfig(engine="sglang", sglang_python="/nonexistent/venv/bin/python")
    with pytest.raises(SGLangNotInstalled, match="make sglang-cpu"):
        launch_servers(cfg, str(tiny_model_dir))


def test_generate_shapes_logprobs_and_greedy(own_engine, hf_model):
    out = own_engine.generate(PROMPTS[:3], 2, SamplingParams(temperature=0.0, max_new_tokens=12), seed=0)
    assert [len(row) for row in out] == [2, 2, 2]
    for p, row in zip(PROMPTS, out):
        ref = hf_greedy(hf_model, p, 12)
        for c in row:
            assert c.output_ids == ref and c.finish_reason == "length"
            assert torch.allclose(torch.tensor(c.output_logprobs), recompute_logprobs(hf_model, p, ref, 1.0), atol=1e-4)


def test_samples_follow_prompt_and_sample_index_seeds(own_engine, hf_model):
    params = SamplingParams(temperature=1.0, max_new_tokens=12)
    a = own_engine.generate(PROMPTS, 3, params, seed=5)
    b = own_engine.generate(PROMPTS, 3, params, seed=5)
    c = own_engine.generate(PROMPTS, 3, params, seed=6)
    ids = lambda out: [[x.output_ids for x in row] for row in out]  # noqa: E731
    assert ids(a) == ids(b) and ids(a) != ids(c)
    assert all(len({tuple(x) for x in row}) == 3 for row in ids(a))
    # Prompt i's samples do not depend on the other prompts of the call.
    alone = own_engine.generate(PROMPTS[:2], 3, params, seed=5)
    assert ids(alone) == ids(a)[:2]
    for p, row in zip(PROMPTS, a):
        for x in row:
            ref = recompute_logprobs(hf_model, p, x.output_ids, 1.0)
            assert torch.allclose(torch.tensor(x.output_logprobs), ref, atol=1e-4)


def test_bad_prompts_are_refused_before_anything_is_sent(own_engine, contract):
    sent = contract.requests_seen
    with pytest.raises(ValueError, match="prompt 1 position 2: token id 512 is outside the vocabulary"):
        own_engine.generate([[1, 2], [3, 4, 512]], 1, SamplingParams(max_new_tokens=4), seed=0)
    with pytest.raises(ValueError, match="prompt 0: 1000 prompt tokens"):
        own_engine.generate([[1] * 1000], 1, SamplingParams(max_new_tokens=100), seed=0)
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        own_engine.generate([[]], 1, SamplingParams(max_new_tokens=4), seed=0)
    for n in (0, 1025, 200000, True, 2.0):
        with pytest.raises(ValueError, match=rf"n must be an integer in \[1, rollout.max_n=1024\], got {n!r}"):
            own_engine.generate([[1, 2]], n, SamplingParams(max_new_tokens=4), seed=0)
    assert contract.requests_seen == sent
    with pytest.raises(ValueError, match="rollout.n=32 is above rollout.max_n=16"):
        RolloutConfig(n=32, max_n=16)


def test_weight_sync_from_disk(own_engine, hf_model, tiny_model_dir, weight_dir):
    params = SamplingParams(temperature=0.0, max_new_tokens=10)
    new = perturbed_weights(hf_model, seed=3)
    path = weight_transport.write_safetensors_dir(new.items(), weight_dir / "v1", config_from=tiny_model_dir)
    own_engine.update_weights_from_disk(str(path), "disk-1")
    new_model = model_with(tiny_model_dir, new)
    try:
        out = own_engine.generate(PROMPTS[:2], 1, params, seed=0)
        assert [row[0].output_ids for row in out] == [hf_greedy(new_model, p, 10) for p in PROMPTS[:2]]
        assert out[0][0].meta["weight_version"] == "disk-1"
        with pytest.raises(RolloutError, match="did not load|400"):
            own_engine.update_weights_from_disk("/nonexistent/dir", "disk-2")
    finally:
        own_engine.update_weights_from_disk(str(tiny_model_dir), "default")


def test_weight_sync_distributed_bucketed(own_engine, hf_model, tiny_model_dir):
    """Single-process form: every tensor broadcast from here in small buckets (gloo)."""
    new = perturbed_weights(hf_model, seed=4)
    new_model = model_with(tiny_model_dir, new)
    params = SamplingParams(temperature=0.0, max_new_tokens=10)
    own_engine.update_weights_from_distributed(new.items(), "dist-1")
    try:
        sender = own_engine._local_sender[1]
        assert sender.bytes_sent == sum(t.numel() * t.element_size() for t in new.values())
        out = own_engine.generate(PROMPTS[:2], 1, params, seed=0)
        assert [row[0].output_ids for row in out] == [hf_greedy(new_model, p, 10) for p in PROMPTS[:2]]
        assert out[0][0].meta["weight_version"] == "dist-1"
        # The group stays open: a second sync reuses it.
        own_engine.update_weights_from_distributed(hf_model.state_dict().items(), "dist-2")
        out = own_engine.generate(PROMPTS[:2], 1, params, seed=0)
        assert [row[0].output_ids for row in out] == [hf_greedy(hf_model, p, 10) for p in PROMPTS[:2]]
    finally:
        own_engine.update_weights_from_disk(str(tiny_model_dir), "default")


def test_weight_sync_per_pipeline_stage(own_engine, hf_model, tiny_model_dir):
    """Two pipeline stages, each its own group and sender (threads stand in for the stage
    ranks), each sending only its layers; the server ends up with all of them."""
    own_engine.close_weight_sync()  # the single-process group of the test above
    new = perturbed_weights(hf_model, scale=4.0, seed=5)
    stage_of = lambda name: 1 if ("layers.2." in name or "layers.3." in name or name in ("model.norm.weight", "lm_head.weight")) else 0  # noqa: E731
    own_engine.begin_weight_update()
    senders = [DistributedWeightSender(own_engine.weight_sync_target(stage)) for stage in (0, 1)]
    assert senders[0].target.group_name != senders[1].target.group_name
    errors: list[BaseException] = []

    def stage_rank(stage: int) -> None:
        try:
            senders[stage].open()
            senders[stage].send(((n, t) for n, t in new.items() if stage_of(n) == stage), version="pp-1")
        except BaseException as e:  # reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=stage_rank, args=(s,)) for s in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    own_engine.end_weight_update("pp-1")
    try:
        assert not errors, errors
        assert senders[0].bytes_sent > 0 and senders[1].bytes_sent > 0
        new_model = model_with(tiny_model_dir, new)
        out = own_engine.generate(PROMPTS[:2], 1, SamplingParams(temperature=0.0, max_new_tokens=10), seed=0)
        assert [row[0].output_ids for row in out] == [hf_greedy(new_model, p, 10) for p in PROMPTS[:2]]
    finally:
        for s in senders:
            s.close()
        own_engine.update_weights_from_disk(str(tiny_model_dir), "default")


def test_attach_to_a_running_server(own_engine, tiny_model_dir, hf_model):
    cfg = RolloutConfig(engine="attach", urls=(own_engine.urls[0],))
    with SGLangEngine.from_config(cfg, str(tiny_model_dir)) as attached:
        assert attached.healthy()
        out = attached.generate(PROMPTS[:1], 1, SamplingParams(temperature=0.0, max_new_tokens=6), seed=0)
        assert out[0][0].output_ids == hf_greedy(hf_model, PROMPTS[0], 6)
    assert own_engine.healthy()  # closing an attached engine leaves the server running


def _kill_after(engine: SGLangEngine, server: int, done_units: int, killed: list) -> None:
    deadline = time.monotonic() + 120
    while engine.completed_units < done_units and time.monotonic() < deadline:
        time.sleep(0.01)
    engine.processes[server].kill()
    killed.append(engine.completed_units)


@pytest.mark.parametrize("num_servers", [2, 1], ids=["failover", "restart"])
def test_server_killed_mid_batch_every_prompt_exactly_once(tiny_model_dir, tmp_path, num_servers):
    prompts = [[1, 30 + i, 50, 7] for i in range(12)]
    params = SamplingParams(temperature=1.0, max_new_tokens=40)
    cfg = own_engine_config(num_servers=num_servers, concurrency=1, log_dir=str(tmp_path), retry_backoff_s=0.1)
    with SGLangEngine.from_config(cfg, str(tiny_model_dir)) as engine:
        reference = engine.generate(prompts, 4, params, seed=7)
        start = engine.completed_units
        killed: list = []
        killer = threading.Thread(target=_kill_after, args=(engine, 0, start + 3, killed))
        killer.start()
        out = engine.generate(prompts, 4, params, seed=7)
        killer.join()
        assert killed and killed[0] < start + len(prompts), "the kill must land mid-batch"
        assert engine.completed_units == start + len(prompts)  # each prompt answered exactly once
        assert [[c.output_ids for c in row] for row in out] == [[c.output_ids for c in row] for row in reference]
        for row, ref_row in zip(out, reference):
            for c, r in zip(row, ref_row):
                assert torch.allclose(torch.tensor(c.output_logprobs), torch.tensor(r.output_logprobs), atol=1e-4)
        if num_servers == 2:
            assert any(c.meta["server"] == engine.urls[1] for row in out for c in row)
        # The dead server was relaunched and serves again.
        deadline = time.monotonic() + 60
        while not engine.healthy() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert engine.processes[0].restarts == 1 and engine.healthy()


def test_weight_sync_while_the_only_server_is_dead_restarts_it_with_the_new_weights(tiny_model_dir, hf_model, tmp_path):
    params = SamplingParams(temperature=0.0, max_new_tokens=10)
    new = perturbed_weights(hf_model, seed=5)
    path = weight_transport.write_safetensors_dir(new.items(), tmp_path / "w", config_from=tiny_model_dir)
    cfg = own_engine_config(num_servers=1, log_dir=str(tmp_path), retry_backoff_s=0.1, weight_dir=str(tmp_path))
    with SGLangEngine.from_config(cfg, str(tiny_model_dir)) as engine:
        engine.processes[0].kill()
        engine.update_weights_from_disk(str(path), "after-restart")
        assert engine.processes[0].restarts == 1
        out = engine.generate(PROMPTS[:2], 1, params, seed=0)
        new_model = model_with(tiny_model_dir, new)
        assert [row[0].output_ids for row in out] == [hf_greedy(new_model, p, 10) for p in PROMPTS[:2]]
        assert out[0][0].meta["weight_version"] == "after-restart"
