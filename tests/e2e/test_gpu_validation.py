"""The GPU validation run as a user runs it, at the tiny shape on CPU (fp32): every part runs,
the step-0 ratio is exactly 1, tokens are counted from the rows, FP8 parts say they need
Transformer Engine. No timing is asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.gpu import gpu_validation as gv

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """The script as a user runs it (its own process: it starts torch.distributed and the CPU
    compatibility layer, which must not leak into this test process)."""
    out = tmp_path_factory.mktemp("gpu_validation")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "benchmarks/gpu/gpu_validation.py", "--shape", "tiny", "--quick", "--out", str(out),
                           "--parts", ",".join(gv.PARTS)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (js,) = out.glob("*-gpu-quick.json")
    return json.loads(js.read_text()), js.with_suffix(".md").read_text(), js.name


def _figures(results, key):
    entry = results["parts"][key]
    assert "figures" in entry, entry.get("traceback", entry)
    return entry["figures"]


def test_every_part_ran_and_files_are_named_by_date_and_device(tiny_run):
    results, md, name = tiny_run
    assert name == f"{results['date']}-{results['device']}-gpu-quick.json"
    assert results["device"].startswith("cpu-")
    assert list(results["parts"]) == ["smoke/tiny", "train/tiny", "step0/tiny", "logprobs/tiny", "sync/tiny"]
    assert f"--shape tiny --parts {','.join(gv.PARTS)}" in md
    assert "cannot be installed" in results["sglang"] and "SGLang" in md
    assert results["matmul_peak"]["dtype"] == "fp32" and results["matmul_peak"]["peak_flops"] > 0


def test_smoke_checks_the_layer_spec_weight_names_and_fp8_step0(tiny_run):
    results, md, _ = tiny_run
    f = _figures(results, "smoke/tiny")
    # no TE here: the local spec, and it is what TE's absence calls for
    assert f["layer_spec"]["te_available"] is False and f["layer_spec"]["te_spec"] is False
    assert f["layer_spec"]["linear_qkv"].endswith("ColumnParallelLinear")
    # every HF tensor back bitwise, tied head excluded (the tiny shape ties nothing)
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        names = set(AutoModelForCausalLM.from_config(gv.SHAPES["tiny"].hf_config()).state_dict())
    assert f["weights"] == {"tensors": len(names), "missing": [], "extra": [], "mismatched": [], "exact": True}
    assert f["fp8_step0"]["status"] == "not run" and "Transformer Engine" in f["fp8_step0"]["reason"]
    assert f["ok"] is True and "## 0. Smoke" in md and "**OK**" in md


def test_step0_ratio_is_exactly_one_in_fp32_and_fp8_needs_te(tiny_run):
    results, md, _ = tiny_run
    f = _figures(results, "step0/tiny")
    x = f["compute"]
    assert x["status"] == "ran" and x["dtype"] == "fp32"
    assert x["exactly_one"] and x["rows_bitwise_equal"] == x["rows"] == 8
    assert x["max_abs_dlogp"] == 0.0 and x["ratio_min"] == 1.0 and x["ratio_max"] == 1.0
    assert x["microbatches"] > 1  # the check crosses micro-batch boundaries
    # the estimator's own view of the same step
    assert x["estimator_ratio_max"] == 1.0
    assert x["estimator_ratio_mean"] == pytest.approx(1.0, abs=1e-6)
    rows = gv.mixed_rows_16(gv.SHAPES["tiny"], 8, gv.SHAPES["tiny"].seq_tokens // 2)
    assert x["tokens"] == sum(len(r.response_ids) for r in rows)
    assert f["fp8"]["status"] == "not run" and "Transformer Engine" in f["fp8"]["reason"]
    assert "ratio exactly 1" in md


def test_training_step_figures_are_consistent(tiny_run):
    results, _, _ = tiny_run
    f = _figures(results, "train/tiny")
    shape = gv.SHAPES["tiny"]
    assert f["dtype"] == "fp32" and f["ours_layout"] == "packed" and f["sides_freed"]
    # 6N uses the model's real parameter count (tied embeddings once)
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        hf_params = sum(p.numel() for p in AutoModelForCausalLM.from_config(shape.hf_config()).parameters())
    assert f["parameters"] == hf_params
    expected_rows = {"fixed": gv.fixed_rows(shape), "longtail": gv.longtail_rows(shape)}
    for name, rows in expected_rows.items():
        w = f["workloads"][name]
        assert w["tokens_per_step"] == sum(len(r.prompt_ids) + len(r.response_ids) for r in rows)
        assert w["row_tokens"] == [r.num_tokens for r in rows]
        assert w["positions_per_step"] == w["tokens_per_step"] - len(rows)
        for kind in ("ours", "hf"):
            x = w[kind]
            assert x["padded_positions"] >= w["positions_per_step"]
            assert x["padding_efficiency"] == pytest.approx(w["positions_per_step"] / x["padded_positions"])
            assert x["tokens_per_s"] == pytest.approx(w["tokens_per_step"] / x["step_s_median"])
            assert x["mfu_6n"] == pytest.approx(6 * f["parameters"] * x["tokens_per_s"] / f["matmul_peak_flops"])
        assert w["ratio_tokens_per_s"] == pytest.approx(w["ours"]["tokens_per_s"] / w["hf"]["tokens_per_s"])
    fixed = f["workloads"]["fixed"]
    assert fixed["tokens_per_step"] == 2 * shape.seq_tokens
    assert fixed["ours"]["microbatches"] == fixed["hf"]["microbatches"] == 1
    # same weights, same loss, fp32: the two implementations agree on the first step
    assert fixed["first_loss_rel_gap"] < 1e-5
    assert f["workloads"]["longtail"]["first_loss_rel_gap"] < 1e-4  # after the same fixed-workload updates
    # long tail: HF pads consecutive pairs; ours groups rows by length under the budget
    tail = f["workloads"]["longtail"]
    assert tail["hf"]["microbatches"] == shape.longtail_rows // 2
    assert tail["ours"]["microbatches"] < tail["hf"]["microbatches"]


def test_logprobs_and_sync_figures(tiny_run):
    results, md, _ = tiny_run
    f = _figures(results, "logprobs/tiny")
    shape = gv.SHAPES["tiny"]
    assert f["tokens"] == shape.logprob_rows * (shape.seq_tokens + 1)
    assert f["compute"]["tokens_per_s"] == pytest.approx(f["tokens"] / f["compute"]["s_median"])
    assert f["fp8"].startswith("needs Transformer Engine") and "fp8_over_bf16_throughput" not in f
    assert "bf16_vs_fp32" not in f  # fp32 on CPU: nothing to compare against
    s = _figures(results, "sync/tiny")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(shape.hf_config())
    weight_bytes = sum(p.numel() * 4 for p in model.parameters())
    assert s["round_trip_exact"] and s["bytes"] > weight_bytes  # the weights plus safetensors headers
    assert s["bytes"] < weight_bytes + 64 * 1024
    assert s["total_s_per_gb"] == pytest.approx((s["write_s"] + s["fsync_s"] + s["read_s"] + s["to_device_s"]) / s["gb"])
    assert "needs Transformer Engine" in md
