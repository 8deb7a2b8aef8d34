"""The sampling core of the own server, against naive formulas and HF."""

from __future__ import annotations

import torch

from megatron_hpt.rollout.generation import (
    TOP_K_ALL,
    BatchGenerator,
    SequenceSpec,
    filter_probs,
    sample_from_probs,
    splitmix64,
    uniform_from_seed,
)

from rollout_testlib import hf_greedy, recompute_logprobs

M64 = (1 << 64) - 1


def _splitmix64_reference(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & M64
    z = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def test_splitmix64_matches_unsigned_reference():
    values = [0, 1, 7, 2**63 - 1, -1, -(2**63), 123456789012345]
    got = splitmix64(torch.tensor(values, dtype=torch.int64)).tolist()
    assert [g & M64 for g in got] == [_splitmix64_reference(v & M64) for v in values]


def test_uniform_from_seed_is_uniform_and_pure():
    seeds = torch.arange(20000, dtype=torch.int64)
    u = uniform_from_seed(seeds, torch.zeros_like(seeds))
    assert float(u.min()) >= 0.0 and float(u.max()) < 1.0
    # Kolmogorov-Smirnov distance to U(0,1): 1.63/sqrt(n) is the 1% critical value.
    sorted_u = u.sort().values
    ks = (sorted_u - torch.arange(1, 20001, dtype=torch.float64) / 20000).abs().max()
    assert ks < 1.63 / 20000**0.5
    assert torch.equal(u, uniform_from_seed(seeds, torch.zeros_like(seeds)))
    assert not torch.equal(u, uniform_from_seed(seeds, torch.ones_like(seeds)))


def test_filter_probs_matches_naive_rule():
    torch.manual_seed(0)
    probs = torch.softmax(torch.randn(6, 40) * 2, dim=-1)
    top_k = torch.tensor([TOP_K_ALL, 5, TOP_K_ALL, 3, 1, 40])
    top_p = torch.tensor([1.0, 1.0, 0.6, 0.8, 0.9, 0.3])
    kept, index = filter_probs(probs, top_k, top_p)
    for r in range(6):
        order = probs[r].argsort(descending=True).tolist()
        expected = set()
        mass = 0.0
        for rank, tok in enumerate(order):
            if rank < int(top_k[r]) and mass <= float(top_p[r]) + 1e-7:
                expected.add(tok)
            mass += float(probs[r, tok])
        got = {int(index[r, c]) for c in range(40) if kept[r, c] > 0}
        assert got == expected, r


def test_inverse_cdf_sampling_follows_the_distribution():
    weights = torch.tensor([[0.5, 0.0, 0.2, 0.3]]).repeat(40000, 1)
    u = uniform_from_seed(torch.arange(40000, dtype=torch.int64), torch.full((40000,), 3, dtype=torch.int64))
    cols = sample_from_probs(weights, u)
    freq = torch.bincount(cols, minlength=4).double() / 40000
    assert freq[1] == 0
    assert torch.allclose(freq, weights[0].double(), atol=0.01)


def test_greedy_equals_hf_generate_and_logprobs_equal_recomputation(hf_model):
    gen = BatchGenerator(hf_model)
    prompts = [[1, 40, 50, 60], [5, 6, 7, 8, 9, 10, 11, 12], [300, 2]]
    specs = [SequenceSpec(prompt_ids=tuple(p), max_new_tokens=24, temperature=0.0, top_k=1) for p in prompts]
    for p, r in zip(prompts, gen.generate(specs)):
        assert r.output_ids == hf_greedy(hf_model, p, 24)
        assert r.finish_type == "length"
        ref = recompute_logprobs(hf_model, p, r.output_ids, 1.0)
        assert torch.allclose(torch.tensor(r.output_logprobs), ref, atol=1e-4)


def test_sampled_logprobs_are_full_vocab_log_softmax_at_temperature(hf_model):
    gen = BatchGenerator(hf_model)
    specs = [
        SequenceSpec(prompt_ids=(1, 40, 50), max_new_tokens=20, temperature=t, top_p=p, top_k=k, seed=s)
        for s, (t, p, k) in enumerate([(0.7, 0.9, 50), (1.0, 1.0, TOP_K_ALL), (1.3, 0.5, 10), (0.7, 1.0, 3)])
    ]
    for spec, r in zip(specs, gen.generate(specs)):
        ref = recompute_logprobs(hf_model, list(spec.prompt_ids), r.output_ids, spec.temperature)
        assert torch.allclose(torch.tensor(r.output_logprobs), ref, atol=1e-4)
    # top_k=3: every token is among the 3 most likely of its step.
    r = gen.generate(specs[3:])[0]
    with torch.no_grad():
        logits = hf_model(torch.tensor([[1, 40, 50] + r.output_ids])).logits[0, 2:-1]
    top3 = logits.topk(3, dim=-1).indices
    assert all(t in top3[i].tolist() for i, t in enumerate(r.output_ids))


def test_samples_depend_on_seed_not_on_batch(hf_model):
    gen = BatchGenerator(hf_model)
    specs = [SequenceSpec(prompt_ids=(1, 40 + i % 3, 50), max_new_tokens=16, temperature=1.0, seed=100 + i) for i in range(9)]
    together = gen.generate(specs)
    alone = gen.generate([specs[4]])[0]
    assert alone.output_ids == together[4].output_ids
    assert len({tuple(r.output_ids) for r in together}) == 9
    again = gen.generate(specs[::-1])[::-1]
    assert [r.output_ids for r in again] == [r.output_ids for r in together]


def test_stop_tokens_and_zero_length(hf_model):
    gen = BatchGenerator(hf_model)
    first = gen.generate([SequenceSpec(prompt_ids=(1, 40, 50, 60), max_new_tokens=8, temperature=0.0)])[0]
    stop_at = first.output_ids[2]
    r = gen.generate(
        [
            SequenceSpec(prompt_ids=(1, 40, 50, 60), max_new_tokens=8, temperature=0.0, stop_token_ids=frozenset({stop_at})),
            SequenceSpec(prompt_ids=(1, 40, 50, 60), max_new_tokens=0, temperature=0.0),
        ]
    )
    cut = first.output_ids.index(stop_at) + 1
    assert r[0].output_ids == first.output_ids[:cut] and r[0].finish_type == "stop" and r[0].matched_stop == stop_at
    assert r[1].output_ids == [] and r[1].finish_type == "length"
