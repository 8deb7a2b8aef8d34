"""The GPU validation's plumbing: its long-tail lengths and model shapes, and a failing part
recorded while the others run. The script's whole run at the tiny shape on CPU is in
tests/e2e/test_gpu_validation.py. No timing is asserted."""

from __future__ import annotations

import pytest
import torch

from benchmarks.gpu import gpu_validation as gv


def test_longtail_lengths_are_the_batching_tests_distribution():
    from tests.unit.training.test_batching import paper_like_lengths

    assert gv.paper_like_lengths(200, seed=4) == paper_like_lengths(200, seed=4)
    shape = gv.SHAPES["qwen2.5-1.5b"]
    rows = gv.longtail_rows(shape)
    lengths = [r.num_tokens for r in rows]
    assert len(rows) == shape.longtail_rows and max(lengths) <= shape.seq_tokens
    assert max(lengths) > 3 * sorted(lengths)[len(lengths) // 2] / 2  # a long tail, not a uniform spread
    assert {r.kind for r in rows} == {"sft", "rl"}


@pytest.mark.parametrize("name,params", [("qwen2.5-1.5b", 1_543_714_304), ("qwen2.5-7b", 7_615_616_512)])
def test_shapes_are_the_qwen_models(name, params):
    """Parameter counts of the real Qwen2.5-1.5B and -7B, from the model built on the meta device,
    and the 6N count the MFU uses."""
    from transformers import AutoModelForCausalLM

    from benchmarks.bench_models import num_parameters

    hf = gv.SHAPES[name].hf_config()
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf)
    assert sum(p.numel() for p in model.parameters()) == params
    assert num_parameters(hf) == params
    from megatron_hpt.models.builder import ModelConfig, rope_settings

    assert rope_settings(hf, ModelConfig(hf_path="-")).theta == 1e6


def test_failing_part_is_recorded_and_others_run(tmp_path, monkeypatch):
    torch.set_num_threads(1)

    def boom(*a, **k):
        raise RuntimeError("CUDA out of memory in the plain step")

    sync = {"shape": "tiny", "dtype": "fp32", "bytes": 10**9, "gb": 1.0, "files": 1, "write_s": 1.0, "fsync_s": 0.5,
            "read_s": 0.25, "to_device_s": 0.0, "page_cache_dropped": True, "write_s_per_gb": 1.5,
            "read_s_per_gb": 0.25, "total_s_per_gb": 1.75, "round_trip_exact": True}
    monkeypatch.setattr(gv, "part_train", boom)
    monkeypatch.setitem(gv.PART_FUNCS, "sync", lambda *a, **k: sync)
    results = gv.run(quick=True, shapes=["tiny"], parts=("train", "sync"), out_dir=tmp_path, log=lambda _: None)
    assert "out of memory" in results["parts"]["train/tiny"]["error"]
    assert results["parts"]["sync/tiny"]["figures"] == sync
    md = next(tmp_path.glob("*-gpu-quick.md")).read_text()
    assert "**Failed**: `RuntimeError: CUDA out of memory in the plain step`" in md
    assert "write + fsync **1.50 s/GB**" in md
    skipped = gv.run(quick=True, shapes=["tiny"], parts=("sync",), budget_s=0.0, log=lambda _: None)
    assert skipped["parts"]["sync/tiny"]["skipped"].startswith("time budget")
    with pytest.raises(SystemExit, match="unknown shape.*known: tiny"):
        gv.run(shapes=["llama-70b"], log=lambda _: None)
