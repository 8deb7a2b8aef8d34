"""`megatron-hpt compare` end to end on the tiny model: HPT and SFT->GRPO, one seed, two
steps. The table, the curves and pass@k are checked against each run's own files; the
two-stage run against what its stages must hand over (weights, data position, a fresh
optimizer). A second invocation finds everything finished and retrains nothing."""

from __future__ import annotations

import json
import math
import time

import pytest
import torch
import yaml

from megatron_hpt.trainer.compare import main as compare_main
from tests.e2e.conftest import SMALL_RUN, metrics

STEPS = 2
BATCH = 4
N_PASS = 4


@pytest.fixture(scope="module")
def comparison(tmp_path_factory, demo_models):
    import pyarrow.parquet as pq

    root = tmp_path_factory.mktemp("compare")
    # 16 held-out prompts keep each evaluation to a second.
    table = pq.read_table("data/arithmetic/eval.parquet")
    pq.write_table(table.slice(0, 16), root / "eval16.parquet")
    hf_dir, megatron_dir = demo_models
    small = [o for o in SMALL_RUN if not o.startswith(("eval_every=", "checkpoint.export_hf="))]
    argv = [
        "--recipe", "demo-cpu", "--algorithms", "hpt,sft_then_grpo", "--seeds", "1",
        "--output-dir", str(root / "out"), "--parallel", "2", "--pass-k-samples", str(N_PASS),
        f"model.hf_path={hf_dir}", f"checkpoint.init_megatron={megatron_dir}", *small,
        f"train.steps={STEPS}", f"train.rollout_batch_size={BATCH}", "eval_every=1", "eval.max_new_tokens=12",
        f"eval.benchmarks=[{{name: arith_eval, path: {root / 'eval16.parquet'}, num_samples: 1}}]",
    ]
    start = time.perf_counter()
    rc = compare_main(argv)
    first_wall = time.perf_counter() - start
    return {"rc": rc, "argv": argv, "out": root / "out", "wall": first_wall}


def _last_eval(records: list[dict]) -> dict:
    return [r for r in records if "eval/accuracy" in r][-1]


def test_table_matches_each_runs_metrics(comparison):
    assert comparison["rc"] == 0
    out = comparison["out"]
    for name in ("comparison.md", "comparison.json", "learning_curves.png", "pass_at_k.png", "commands.txt"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    data = json.loads((out / "comparison.json").read_text())
    table = data["table"]
    assert table["columns"] == ["arith_eval", "avg"]
    rows = {r["algorithm"]: r for r in table["rows"]}
    assert list(rows) == ["hpt", "sft_then_grpo"]
    final_dirs = {"hpt": out / "runs/hpt/seed1234", "sft_then_grpo": out / "runs/sft_then_grpo/seed1234/stage2-grpo"}
    md = (out / "comparison.md").read_text()
    for algorithm, run_dir in final_dirs.items():
        last = _last_eval(metrics(run_dir))
        expected = 100.0 * last["eval/arith_eval"]
        row = rows[algorithm]
        assert row["seeds"] == [1234]
        assert row["per_seed"]["1234"]["arith_eval"] == pytest.approx(expected, abs=1e-9)
        assert row["mean"]["arith_eval"] == pytest.approx(expected, abs=1e-9)
        assert row["mean"]["avg"] == pytest.approx(expected, abs=1e-9)  # one benchmark: Avg is it
        assert row["std"]["arith_eval"] is None  # one seed: no std
        display = {"hpt": "HPT", "sft_then_grpo": "SFT->GRPO"}[algorithm]
        assert any(line.startswith(f"| {display} |") and f"{expected:.1f}" in line for line in md.splitlines())
        # The trainer's eval report row is the last step's, the same numbers as metrics.jsonl.
        report = json.loads((run_dir / "eval" / "eval_report.json").read_text())
        final_row = [d for m, d in report["details"].items() if m.endswith(f"@{last['step']}")]
        assert final_row and final_row[0]["arith_eval"]["avg_at_k"] == pytest.approx(last["eval/arith_eval"])
    # Same budget: every run logged STEPS training steps of BATCH prompts.
    assert data["budget"]["logged_steps"] == {"hpt": [STEPS], "sft_then_grpo": [STEPS]}
    assert data["budget"]["prompts_seen"] == STEPS * BATCH


def test_curves_are_the_runs_metrics_on_one_step_axis(comparison):
    out = comparison["out"]
    curves = json.loads((out / "comparison.json").read_text())["curves"]
    hpt = metrics(out / "runs/hpt/seed1234")
    entropy = curves["hpt"]["actor/entropy"]
    assert entropy["step"] == [1, 2]
    assert entropy["mean"] == pytest.approx([r["actor/entropy"] for r in hpt if "actor/entropy" in r])
    stage1 = metrics(out / "runs/sft_then_grpo/seed1234/stage1-sft")
    stage2 = metrics(out / "runs/sft_then_grpo/seed1234/stage2-grpo")
    two = curves["sft_then_grpo"]
    # stage 1's step 1 is step 1, stage 2's step 1 is step 2; SFT then GRPO rows
    assert two["hpt/sft_prompt_frac"]["step"] == [1, 2]
    assert two["hpt/sft_prompt_frac"]["mean"] == [1.0, 0.0]
    evals = two["eval/accuracy"]
    assert evals["step"] == [0, 1, 2]
    assert evals["mean"] == pytest.approx(
        [stage1[0]["eval/accuracy"], _last_eval(stage1)["eval/accuracy"], _last_eval(stage2)["eval/accuracy"]])


def test_second_stage_starts_from_the_first(comparison):
    out = comparison["out"]
    stage1 = out / "runs/sft_then_grpo/seed1234/stage1-sft"
    stage2 = out / "runs/sft_then_grpo/seed1234/stage2-grpo"
    cfg1, cfg2 = (yaml.safe_load((d / "config.yaml").read_text()) for d in (stage1, stage2))
    assert (cfg1["algorithm"]["preset"], cfg1["train"]["steps"]) == ("sft", 1)
    assert (cfg2["algorithm"]["preset"], cfg2["train"]["steps"]) == ("grpo", 1)
    assert cfg2["checkpoint"]["init_megatron"] == str(stage1 / "checkpoints/step_000001/weights")
    first = metrics(stage2)[1]
    # The rollouts of stage 2's first step come from stage 1's final weights: the rollout
    # server's log-probs equal the trainer's (a server left on the initial model is ~0.3 off).
    assert first["rows/rl"] > 0
    assert first["rollout/logp_gap_abs"] < 1e-4
    # The stage-2 evaluation before its first step is stage 1's last one (same weights, greedy).
    assert metrics(stage2)[0]["step"] == 0
    assert metrics(stage2)[0]["eval/arith_eval"] == _last_eval(metrics(stage1))["eval/arith_eval"]
    # Fresh optimizer and schedule, and the data order continued where stage 1 stopped.
    state1 = torch.load(stage1 / "checkpoints/step_000001/trainer_state.pt", weights_only=False)
    state2 = torch.load(stage2 / "checkpoints/step_000001/trainer_state.pt", weights_only=False)
    minibatches = BATCH // 2  # SMALL_RUN's mini_batch_size
    assert state1["optimizer_steps"] == state2["optimizer_steps"] == minibatches
    assert state2["scheduler"] == state1["scheduler"]
    assert state1["extra"]["sampler"]["position"] == BATCH
    assert state2["extra"]["sampler"]["position"] == 2 * BATCH


def test_pass_at_k_is_each_final_models_evaluation(comparison):
    out = comparison["out"]
    data = json.loads((out / "comparison.json").read_text())
    assert data["pass_at_k_settings"] == {"num_samples": N_PASS, "temperature": 1.0, "top_p": 1.0}
    for algorithm, run_dir in (("hpt", out / "runs/hpt/seed1234"),
                               ("sft_then_grpo", out / "runs/sft_then_grpo/seed1234/stage2-grpo")):
        report = json.loads((run_dir / "pass_at_k/eval/eval_report.json").read_text())
        (result,) = [d["arith_eval"] for d in report["details"].values()]
        assert result["num_samples"] == N_PASS and result["settings"]["temperature"] == 1.0
        curve = data["pass_at_k"][algorithm]["arith_eval"]
        assert curve["k"] == list(range(1, N_PASS + 1))
        # pass@k from each problem's correct count, computed here (Chen et al.'s estimator)
        correct = result["correct_per_problem"]
        for k, value in zip(curve["k"], curve["mean"]):
            expected = sum(1.0 - math.comb(N_PASS - c, k) / math.comb(N_PASS, k) for c in correct) / len(correct)
            assert value == pytest.approx(100.0 * expected)
        assert curve["mean"][0] == pytest.approx(100.0 * result["avg_at_k"])  # pass@1 is avg@n
        assert curve["mean"] == sorted(curve["mean"])


def test_rerun_skips_finished_runs(comparison, capsys):
    out = comparison["out"]
    before = {p: p.stat().st_mtime_ns for p in out.glob("runs/**/final_hf/config.json")}
    assert len(before) == 3
    start = time.perf_counter()
    assert compare_main(comparison["argv"]) == 0
    assert time.perf_counter() - start < 20  # nothing trained or evaluated again
    printed = capsys.readouterr().out
    assert printed.count("finished earlier, skipped") == 5
    assert {p: p.stat().st_mtime_ns for p in before} == before
