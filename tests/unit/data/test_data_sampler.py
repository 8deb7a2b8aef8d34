"""PromptSampler: deterministic epochs, full coverage, exact resume mid-epoch."""

import json

import pytest

from megatron_hpt.data import PromptSampler, SamplerConfig


def _draw(sampler, n):
    return [sampler.next_batch() for _ in range(n)]


def test_same_seed_same_batches_other_seed_other_batches():
    cfg = SamplerConfig(batch_size=8, seed=3)
    assert _draw(PromptSampler(50, cfg), 20) == _draw(PromptSampler(50, cfg), 20)
    assert _draw(PromptSampler(50, cfg), 6) != _draw(PromptSampler(50, SamplerConfig(batch_size=8, seed=4)), 6)


def test_each_epoch_is_a_fresh_permutation():
    sampler = PromptSampler(20, SamplerConfig(batch_size=5, seed=0, drop_last=False))
    epochs = [sum(_draw(sampler, 4), []) for _ in range(3)]
    for order in epochs:
        assert sorted(order) == list(range(20))
    assert epochs[0] != epochs[1] != epochs[2]
    assert sampler.epoch == 2


def test_drop_last_keeps_batches_full_and_partial_batches_otherwise():
    full = PromptSampler(23, SamplerConfig(batch_size=5, seed=1))
    assert all(len(b) == 5 for b in _draw(full, 12))
    partial = PromptSampler(23, SamplerConfig(batch_size=5, seed=1, drop_last=False))
    assert [len(b) for b in _draw(partial, 6)] == [5, 5, 5, 5, 3, 5]
    in_order = PromptSampler(6, SamplerConfig(batch_size=4, shuffle=False, drop_last=False))
    assert _draw(in_order, 3) == [[0, 1, 2, 3], [4, 5], [0, 1, 2, 3]]


def test_resume_mid_epoch_is_exact():
    cfg = SamplerConfig(batch_size=7, seed=11)
    reference = PromptSampler(40, cfg)
    expected = _draw(reference, 30)  # 5 batches per epoch: crosses several epochs

    interrupted = PromptSampler(40, cfg)
    _draw(interrupted, 13)  # mid-epoch (epoch 2, position 21)
    state = json.loads(json.dumps(interrupted.state_dict()))  # as a checkpoint would store it
    assert (state["epoch"], state["position"]) == (2, 21)

    resumed = PromptSampler(40, cfg)
    resumed.load_state_dict(state)
    assert _draw(resumed, 17) == expected[13:]


def test_resume_refuses_a_different_dataset_or_seed():
    state = PromptSampler(40, SamplerConfig(batch_size=4, seed=1)).state_dict()
    with pytest.raises(ValueError, match="num_prompts=40 but this run has num_prompts=41"):
        PromptSampler(41, SamplerConfig(batch_size=4, seed=1)).load_state_dict(state)
    with pytest.raises(ValueError, match="seed"):
        PromptSampler(40, SamplerConfig(batch_size=4, seed=2)).load_state_dict(state)
    with pytest.raises(ValueError, match="no full batch"):
        PromptSampler(3, SamplerConfig(batch_size=4))


def test_removed_prompts_leave_from_the_next_epoch_on():
    sampler = PromptSampler(20, SamplerConfig(batch_size=4, seed=5))
    first = _draw(sampler, 2)
    learned = first[0][:3]
    sampler.remove(learned)
    rest_of_epoch = sum(_draw(sampler, 3), [])
    assert sorted(sum(first, []) + rest_of_epoch) == list(range(20))  # the current epoch is not changed
    kept = set(range(20)) - set(learned)
    for _ in range(3):  # epochs 1-3: 4 full batches of the 17 prompts left
        epoch = sum(_draw(sampler, 4), [])
        assert len(set(epoch)) == 16 and set(epoch) <= kept
    assert sampler.removed == set(learned) and sampler.epoch == 3
    with pytest.raises(ValueError, match="cannot remove prompt 20"):
        sampler.remove([20])


def test_nothing_removed_keeps_the_old_order():
    """A run that never removes a prompt sees the batches of the sampler before removal existed:
    the permutation of epoch e is numpy's permutation of range(n) for (seed, e)."""
    import numpy as np

    sampler = PromptSampler(30, SamplerConfig(batch_size=10, seed=9))
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([9, 1])))
    _draw(sampler, 3)
    assert sum(_draw(sampler, 3), []) == rng.permutation(30).tolist()


def test_resume_keeps_removed_and_pending_prompts():
    cfg = SamplerConfig(batch_size=5, seed=2)

    def run(sampler, stop=None):
        drawn = []
        for step in range(14):
            if step == stop:
                return drawn, json.loads(json.dumps(sampler.state_dict()))
            batch = sampler.next_batch()
            drawn.append(batch)
            sampler.remove(batch[:1])  # the first prompt of every batch was "learned through SFT"
        return drawn, None

    expected, _ = run(PromptSampler(30, cfg))
    head, state = run(PromptSampler(30, cfg), stop=8)  # mid-epoch, with removals pending
    assert state["pending_removal"] and state["removed"]
    resumed = PromptSampler(30, cfg)
    resumed.load_state_dict(state)
    tail = []
    for _ in range(8, 14):
        batch = resumed.next_batch()
        tail.append(batch)
        resumed.remove(batch[:1])
    assert head + tail == expected
    old = dict(state, version=1)
    del old["removed"], old["pending_removal"]
    PromptSampler(30, cfg).load_state_dict(old)  # checkpoints written before removal existed still load


def test_removing_too_many_prompts_is_explained():
    sampler = PromptSampler(10, SamplerConfig(batch_size=4, seed=0))
    sampler.remove(range(8))
    _draw(sampler, 2)
    with pytest.raises(ValueError, match="epoch 1 has 2 prompts left of 10 after removing 8 learned through SFT"):
        sampler.next_batch()
