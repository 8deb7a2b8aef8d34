"""Sequence packing on CPU, for real: a long-tailed mixed SFT + RL batch packed into one
sequence per micro-batch (megatron's THD path through the local attention) gives the
log-probs, entropy, losses and gradients of the padded layout at TP=2, PP=2 and DP=2."""

from __future__ import annotations

import pytest
import torch

from megatron_hpt.parallel.launch import run_ranks
from tests.multiproc.training_fixtures import layout_run, long_tailed_rows, packed_logits_and_hf

BIG = 8192  # one micro-batch
SMALL = 300  # several micro-batches (the longest row has 222 positions)


def _merge(results):
    forward, grads, shapes = {}, {}, []
    for r in results:
        forward.update(r["forward"])
        grads.update(r["grads"])
        shapes.append(r["shapes"])
    assert {r["layout"] for r in results} == {results[0]["layout"]}
    return {"forward": forward, "metrics": results[0]["metrics"], "grads": grads, "shapes": shapes,
            "layout": results[0]["layout"], "local": [r["local"] for r in results]}


@pytest.fixture(scope="module")
def padded(tiny_qwen2):
    return _merge(run_ranks(layout_run, 1, str(tiny_qwen2), 1, 1, BIG, "padded"))


def _assert_same(ref, got):
    rows = long_tailed_rows()
    assert sorted(got["forward"]) == list(range(len(rows)))
    for i, row in enumerate(rows):
        lp, ent = got["forward"][i]
        ref_lp, ref_ent = ref["forward"][i]
        assert lp.shape == (len(row.response_ids),)
        torch.testing.assert_close(lp, ref_lp, rtol=0, atol=1e-5, msg=f"log-probs of row {i}")
        torch.testing.assert_close(ent, ref_ent, rtol=0, atol=1e-5, msg=f"entropy of row {i}")
    for key in ("loss/total", "loss/pg", "loss/sft", "loss/entropy", "actor/entropy"):
        assert got["metrics"][key] == pytest.approx(ref["metrics"][key], abs=1e-5), key
    assert set(got["grads"]) == set(ref["grads"])
    for name, g in ref["grads"].items():
        torch.testing.assert_close(got["grads"][name], g, rtol=1e-5, atol=1e-5, msg=name)


def test_the_batch_is_long_tailed_and_mixed(padded):
    rows = long_tailed_rows()
    lengths = [r.num_tokens - 1 for r in rows]
    assert sum(lengths) < 0.4 * len(lengths) * max(lengths)  # padded, most positions would be padding
    assert {r.kind for r in rows} == {"sft", "rl"}
    assert padded["layout"] == "padded"
    assert padded["metrics"]["loss/sft"] > 0 and padded["metrics"]["loss/pg"] != 0
    assert max(g.abs().max().item() for g in padded["grads"].values()) > 1e-4


@pytest.mark.parametrize(
    "tp,pp,dp,budget,packing",
    [(1, 1, 1, BIG, "auto"), (1, 1, 1, SMALL, "packed"), (2, 1, 1, BIG, "packed"), (1, 2, 1, SMALL, "packed"),
     (1, 1, 2, SMALL, "packed")],
    ids=["tp1-auto", "tp1-microbatches", "tp2", "pp2-microbatches", "dp2-microbatches"],
)
def test_packed_equals_padded(tiny_qwen2, padded, tp, pp, dp, budget, packing):
    got = _merge(run_ranks(layout_run, tp * pp * dp, str(tiny_qwen2), tp, pp, budget, packing))
    assert got["layout"] == "packed"  # "auto" packs
    # one packed sequence per micro-batch, under the budget, a multiple of the TP size
    for shapes in got["shapes"]:
        assert shapes and all(b == 1 and s <= budget and s % tp == 0 for b, s in shapes), shapes
    if budget == SMALL:  # several micro-batches of different packed lengths (pipeline stages exchange them)
        assert all(len(set(shapes)) > 1 for shapes in got["shapes"]), got["shapes"]
    _assert_same(padded, got)


@pytest.mark.parametrize("name", ["qwen2", "llama"])
def test_packed_logits_are_hf_logits_of_each_row_alone(tiny_hf_models, name):
    """Independent of the padded path: each packed row sees only itself, positioned from its
    own start (Llama-3 scaled RoPE too), whatever sits before it in the pack."""
    lengths = [150, 7, 1, 40, 23, 90]  # a long row, short ones grouped into windows, a 1-token row
    ours, ref, shape = run_ranks(packed_logits_and_hf, 1, str(tiny_hf_models[name]), lengths, 16)[0]
    assert shape == (1, 320)  # 311 positions and a 9-position padding segment
    for b, (o, r) in enumerate(zip(ours, ref)):
        assert o.shape == r.shape == (lengths[b], r.shape[-1])
        torch.testing.assert_close(o, r, rtol=1e-4, atol=1e-4, msg=f"row {b}")
