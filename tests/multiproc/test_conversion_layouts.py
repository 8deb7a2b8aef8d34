"""HF -> hf_to_megatron -> dist checkpoint loaded at TP/PP (1,1), (2,1), (1,2), (2,2):
Megatron logits equal HF logits (fp32) for Qwen2, tied Qwen2 and Llama-3-scaled Llama;
a checkpoint saved by TP=2 ranks loads at TP=1, PP=2, and survives reshard -> HF bit-exactly.

All layouts of all models run in one spawn of 4 ranks (each layout is a
data-parallel split of the 4), because starting ranks dominates the cost.
"""

from __future__ import annotations

import pytest
import torch

from megatron_hpt.models.conversion import convert_megatron_to_hf, reshard_checkpoint
from megatron_hpt.models.verification import hf_logits, rank_checkpoint_logits, verification_tokens
from megatron_hpt.parallel.launch import run_ranks

LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2)]
WORLD = 4


@pytest.fixture(scope="module")
def layout_run(tiny_hf_models, converted_checkpoints, tmp_path_factory):
    """One spawn: every model at every layout; the Qwen2 model loaded at TP=2 is
    saved again by those ranks, and that checkpoint is loaded at TP=1, PP=2."""
    saved_tp2 = tmp_path_factory.mktemp("saved") / "qwen2_tp2"
    tokens = verification_tokens(512)
    jobs, keys = [], []
    for name, ckpt in converted_checkpoints.items():
        for tp, pp in LAYOUTS:
            job = {"ckpt_dir": str(ckpt), "tp": tp, "pp": pp, "tokens": tokens}
            if name == "qwen2" and (tp, pp) == (2, 1):
                job["save_to"] = str(saved_tp2)
            jobs.append(job)
            keys.append((name, tp, pp))
    jobs.append({"ckpt_dir": str(saved_tp2), "tp": 1, "pp": 2, "tokens": tokens})
    keys.append(("qwen2_saved_tp2", 1, 2))
    per_rank = run_ranks(rank_checkpoint_logits, WORLD, jobs, threads_per_rank=1, timeout_s=400)
    logits = {}
    for k, key in enumerate(keys):
        held = [r[k] for r in per_rank if r[k] is not None]
        assert len(held) == 1, f"{key}: expected the logits on exactly one rank, got {len(held)}"
        logits[key] = torch.from_numpy(held[0])
    reference = {name: hf_logits(hf_dir, tokens) for name, hf_dir in tiny_hf_models.items()}
    return {"logits": logits, "reference": reference, "saved_tp2": saved_tp2}


@pytest.mark.parametrize("tp,pp", LAYOUTS)
@pytest.mark.parametrize("name", ["qwen2", "qwen2_tied", "llama"])
def test_megatron_logits_match_hf(layout_run, name, tp, pp):
    got = layout_run["logits"][(name, tp, pp)]
    ref = layout_run["reference"][name]
    assert got.shape == ref.shape == (2, 24, 512)
    assert ref.abs().max() > 0.1  # a model whose logits are all ~0 would match anything
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)


def test_checkpoint_saved_at_tp2_loads_at_pp2(layout_run):
    torch.testing.assert_close(
        layout_run["logits"][("qwen2_saved_tp2", 1, 2)], layout_run["reference"]["qwen2"], atol=1e-4, rtol=0
    )


def test_tp2_checkpoint_reshard_to_pp2_then_hf_is_bit_exact(layout_run, tiny_hf_models, tmp_path):
    from megatron_hpt.models.checkpoint import read_checkpoint_metadata
    from safetensors.torch import load_file

    saved = layout_run["saved_tp2"]
    written = read_checkpoint_metadata(saved)["written_at"]
    assert (written["tensor_model_parallel_size"], written["pipeline_model_parallel_size"]) == (2, 1)
    resharded = tmp_path / "pp2"
    reshard_checkpoint(saved, resharded, tp=1, pp=2, verify=False, log=lambda *_: None)
    meta = read_checkpoint_metadata(resharded)
    assert meta["target_layout"] == {"tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 2}
    assert meta["source"]["written_at"]["tensor_model_parallel_size"] == 2
    hf_out = tmp_path / "hf"
    convert_megatron_to_hf(resharded, hf_out, verify=False, log=lambda *_: None)
    original = load_file(str(tiny_hf_models["qwen2"] / "model.safetensors"))
    back = load_file(str(hf_out / "model.safetensors"))
    assert set(back) == set(original)
    for name, tensor in original.items():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor), name
