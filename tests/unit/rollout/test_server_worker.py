"""The own server's generation worker, served in this process so a test can hold the
model mid-batch (by taking the generator's model lock, as a forward that hangs would):
the watchdog, weight swaps against running requests, aborts of running requests, memory
release, and one failing request among others."""

from __future__ import annotations

import asyncio

import pytest

from megatron_hpt.rollout import weight_transport
from megatron_hpt.rollout.generation import SequenceSpec
from megatron_hpt.rollout.server.scheduler import PendingSequence, Scheduler, WorkerOptions
from megatron_hpt.rollout.server.validation import Row
from rollout_testlib import get, hf_greedy, model_with, perturbed_weights, post
from server_testlib import InProcessServer, in_thread, wait_until

PROMPT = [1, 40, 50, 60]


@pytest.fixture
def server(tiny_model_dir, tmp_path):
    s = InProcessServer(tiny_model_dir, watchdog_timeout_s=0.5, weight_dir=(str(tmp_path),))
    yield s
    s.close()


def _greedy_body(max_new_tokens: int, rid: str | None = None) -> dict:
    body = {"input_ids": PROMPT, "sampling_params": {"temperature": 0, "max_new_tokens": max_new_tokens, "ignore_eos": True}, "return_logprob": True}
    return body if rid is None else {**body, "rid": rid}


def _start_held_request(server: InProcessServer, body: dict):
    """Posts ``body`` while the model is held, and waits until its batch is running (its
    prefill waits for the model). The caller releases ``server.state.generator.model_lock``."""
    gate = server.state.scheduler.gate
    batches = gate.batches_started
    server.state.generator.model_lock.acquire()
    t, out = in_thread(post, server.url, "/generate", body)
    wait_until(lambda: gate.batches_started > batches and gate.batch_active, "the batch to start")
    return t, out


def test_a_stuck_worker_fails_health_generate_until_it_moves_again(server):
    assert get(server.url, "/health_generate")[0] == 200
    t, out = _start_held_request(server, _greedy_body(4))
    status, body = wait_until(lambda: (r := get(server.url, "/health_generate"))[0] == 503 and r, "health_generate to fail", timeout_s=30)
    assert "made no progress" in body["error"]["message"] and "1 sequences waiting" in body["error"]["message"]
    assert get(server.url, "/health")[0] == 200  # liveness alone does not see it
    server.state.generator.model_lock.release()
    t.join(timeout=60)
    assert out[0][0] == 200
    assert get(server.url, "/health_generate")[0] == 200


def test_an_idle_worker_that_cannot_generate_fails_health_generate(server):
    with server.state.generator.model_lock:
        status, body = get(server.url, "/health_generate")
    assert status == 503 and "a one-token health check generation failed" in body["error"]["message"]
    assert "deadline of 0.5 s (--watchdog-timeout-s)" in body["error"]["message"]
    wait_until(lambda: server.state.scheduler.pending == 0, "the health check sequence to be answered")
    assert get(server.url, "/health_generate")[0] == 200


def test_a_dead_worker_fails_health_generate(server):
    server.state.scheduler.close()
    server.state.scheduler.worker.join(timeout=30)
    status, body = get(server.url, "/health_generate")
    assert status == 503 and body == {"error": {"message": "the generation worker has stopped"}}


def test_a_weight_update_waits_for_the_running_request(server, hf_model, tiny_model_dir, tmp_path):
    new = perturbed_weights(hf_model, seed=11)
    path = weight_transport.write_safetensors_dir(new.items(), tmp_path / "step2", config_from=tiny_model_dir)
    t, out = _start_held_request(server, _greedy_body(40))
    u, updated = in_thread(post, server.url, "/update_weights_from_disk", {"model_path": str(path), "weight_version": "v2"})
    wait_until(lambda: server.state.scheduler.gate.generation_held(), "the update to wait for the batch")
    server.state.generator.model_lock.release()
    t.join(timeout=120)
    u.join(timeout=120)
    status, reply = out[0]
    assert status == 200 and updated[0][0] == 200
    # Every token is the old weights' greedy choice, and the reply says so.
    assert reply["output_ids"] == hf_greedy(hf_model, PROMPT, 40)
    assert reply["meta_info"]["weight_version"] == "default"
    assert reply["meta_info"]["weight_versions"] == [{"version": "default", "start": 0, "end": 40}]
    status, reply = post(server.url, "/generate", _greedy_body(40))
    assert reply["output_ids"] == hf_greedy(model_with(tiny_model_dir, new), PROMPT, 40)
    assert reply["meta_info"]["weight_version"] == "v2"


def test_an_update_during_an_in_place_pause_applies_at_once_and_the_reply_keeps_the_start_version(server, hf_model, tiny_model_dir, tmp_path):
    new = perturbed_weights(hf_model, seed=12)
    path = weight_transport.write_safetensors_dir(new.items(), tmp_path / "step3", config_from=tiny_model_dir)
    t, out = _start_held_request(server, _greedy_body(10))
    assert post(server.url, "/pause_generation", {"mode": "in_place"})[0] == 200
    server.state.generator.model_lock.release()
    wait_until(lambda: server.state.scheduler.gate.parked, "the batch to park")
    status, reply = post(server.url, "/update_weights_from_disk", {"model_path": str(path), "weight_version": "v3"})
    assert status == 200 and reply["success"] is True  # no wait for the parked batch
    assert post(server.url, "/continue_generation", {})[0] == 200
    t.join(timeout=120)
    meta = out[0][1]["meta_info"]
    # The first token came from the prefill with the old weights, the other nine with v3.
    assert meta["weight_version"] == "default"
    assert meta["weight_versions"] == [{"version": "default", "start": 0, "end": 1}, {"version": "v3", "start": 1, "end": 10}]
    assert out[0][1]["output_ids"][0] == hf_greedy(hf_model, PROMPT, 1)[0]


def test_abort_by_rid_stops_a_running_request(server):
    t, out = _start_held_request(server, _greedy_body(500, rid="job-1"))
    assert post(server.url, "/abort_request", {"rid": "job-1"})[0] == 200
    server.state.generator.model_lock.release()
    t.join(timeout=120)
    meta = out[0][1]["meta_info"]
    # The abort is seen after the first decoded token.
    assert meta["finish_reason"] == {"type": "abort", "message": "Aborted by /abort_request (rid job-1)."}
    assert meta["completion_tokens"] == 1


def test_released_memory_refuses_new_requests_and_holds_queued_ones_until_resume(server, hf_model):
    assert post(server.url, "/pause_generation", {"mode": "in_place"})[0] == 200
    t, out = in_thread(post, server.url, "/generate", _greedy_body(6))
    wait_until(lambda: server.state.scheduler.pending == 1, "the request to be queued")
    assert post(server.url, "/release_memory_occupation", {})[0] == 200
    assert post(server.url, "/continue_generation", {})[0] == 200
    status, reply = post(server.url, "/generate", _greedy_body(6))
    assert status == 400 and "resume_memory_occupation" in reply["error"]["message"]
    assert get(server.url, "/health_generate")[0] == 200  # released on purpose, not stuck
    assert not out and server.state.scheduler.pending == 1
    assert post(server.url, "/resume_memory_occupation", {})[0] == 200
    t.join(timeout=120)
    assert out[0][0] == 200 and out[0][1]["output_ids"] == hf_greedy(hf_model, PROMPT, 6)


class _FailsOnPrompt:
    """A generator whose batch fails whenever it holds the poisoned prompt."""

    def __init__(self, poisoned: tuple[int, ...]):
        self.poisoned = poisoned
        self.calls: list[int] = []

    def generate(self, specs, tags, hooks):
        from megatron_hpt.rollout.generation import SequenceResult

        self.calls.append(len(specs))
        if any(s.prompt_ids == self.poisoned for s in specs):
            raise RuntimeError("poisoned prompt")
        return [SequenceResult(output_ids=[7], finish_type="length") for _ in specs]


def test_a_failing_request_fails_alone_and_the_worker_lives_on():
    generator = _FailsOnPrompt(poisoned=(13,))
    options = WorkerOptions(max_batch_size=8, batch_wait_s=0.2, watchdog_s=60, max_pending=100)
    scheduler = Scheduler(generator, options, weight_version=lambda: "v0")

    async def run() -> list:
        loop = asyncio.get_running_loop()
        pending = []
        for request_id, prompt in enumerate([(1,), (13,), (2,)]):
            assert scheduler.try_reserve(1)
            row = Row(spec=SequenceSpec(prompt_ids=prompt, max_new_tokens=1), rid=str(request_id), return_logprob=False, skip_special_tokens=True)
            p = PendingSequence(row=row, future=loop.create_future(), loop=loop, abort_epoch=0, deadline=loop.time() + 1e6, request_id=request_id)
            pending.append(p)
        for p in pending:  # queued together: one batch
            scheduler.submit(p)
        return await asyncio.gather(*(p.future for p in pending), return_exceptions=True)

    try:
        ok0, failed, ok2 = asyncio.run(run())
        assert ok0.output_ids == [7] and ok2.output_ids == [7]
        assert isinstance(failed, RuntimeError) and "poisoned prompt" in str(failed)
        assert generator.calls == [3, 1, 1, 1]  # the batch, then each request alone
        assert scheduler.worker.is_alive() and scheduler.pending == 0
    finally:
        scheduler.close()
