"""run_all's plumbing (no benchmark is timed here): every benchmark's figures, a failing
one's error, goals with their verdicts, and both result files named by date and device."""

from __future__ import annotations

import json
import sys
import types

import pytest

from benchmarks import run_all as ra


@pytest.fixture
def fake_benchmarks(monkeypatch):
    good = types.ModuleType("fake_logprob")
    good.run = lambda quick=False: {
        "tokens": 512 if quick else 4096, "vocab": 7, "logits_dtype": "bf16", "threads": 1,
        "naive_peak_mib": 100.0, "chunked_peak_mib": 30.0, "naive_time_s": 1.0, "chunked_time_s": 1.1,
        "naive_cpu_time_s": 1.0, "chunked_cpu_time_s": 1.3, "memory_ratio": 0.3, "time_ratio": 1.3,
        "wall_time_ratio": 1.1,
    }
    bad = types.ModuleType("fake_broken")

    def broken(quick=False):
        raise RuntimeError("the naive variant needs 13 GiB")

    bad.run = broken
    other = types.ModuleType("fake_other")
    other.run = lambda quick=False: {"answer": 42}
    for name, mod in (("fake_logprob", good), ("fake_broken", bad), ("fake_other", other)):
        monkeypatch.setitem(sys.modules, name, mod)
    return (
        ra.Benchmark("logprob_memory", "fake_logprob", "Log-probs"),
        ra.Benchmark("conversion_memory", "fake_broken", "Conversion"),
        ra.Benchmark("something_new", "fake_other", "Unformatted"),
    )


def test_writes_figures_errors_and_goals(tmp_path, fake_benchmarks):
    md_path, json_path = ra.run_all(quick=True, out_dir=tmp_path, benchmarks=fake_benchmarks, log=lambda _: None)
    assert md_path.name == json_path.name.replace(".json", ".md")
    assert md_path.name.endswith(f"-{ra.device_name()}-quick.md")
    results = json.loads(json_path.read_text())
    bench = results["benchmarks"]
    assert bench["logprob_memory"]["figures"]["tokens"] == 512  # quick reached the benchmark
    assert "13 GiB" in bench["conversion_memory"]["error"] and "figures" not in bench["conversion_memory"]
    assert bench["something_new"]["figures"] == {"answer": 42}
    assert len(results["load_start"]) == 3 and all(len(e["load_after"]) == 3 for e in bench.values())
    md = md_path.read_text()
    # memory 0.3 vs <= 0.25: missed by 20%; time 1.3 vs <= 1.2: missed by 8%
    assert "| chunked log-probs peak memory / naive | 0.300 | <= 0.25 | missed by 20% |" in md
    assert "| chunked log-probs CPU time / naive | 1.300 | <= 1.2 | missed by 8% |" in md
    assert "**Failed**: `RuntimeError: the naive variant needs 13 GiB`" in md
    assert '"answer": 42' in md  # a benchmark without a formatter shows its raw figures
    assert "GPU suite: not run" in md


def test_goal_verdicts():
    rows = []
    ra.goal_row(rows, "a", 1.6, 1.5, True)
    ra.goal_row(rows, "b", 0.9, 1.0, True)
    ra.goal_row(rows, "c", None, 1.0, True)
    assert rows[0][3] == "met (+7%)"
    assert rows[1][3] == "missed by 10%"
    assert rows[2][1:] == ("not measured", ">= 1", "n/a")


def test_unknown_benchmark_is_refused(tmp_path, fake_benchmarks):
    with pytest.raises(SystemExit, match="unknown benchmark.*known: logprob_memory"):
        ra.run_all(only=["nope"], out_dir=tmp_path, benchmarks=fake_benchmarks, log=lambda _: None)


def test_packing_summary_and_goal():
    side = {"microbatches": 3, "positions_run": 4651, "fill": 1.0, "budget_fill": 0.757, "step_s_median": 0.8,
            "tokens_per_s": 5722.0}
    figures = {"model": "tiny", "rows": 32, "rows_sft": 8, "tokens_per_step": 4683, "row_tokens_median": 117.5,
               "row_tokens_max": 531, "budget": 2048, "threads": 2, "steps": 3, "packed": side,
               "padded": {**side, "microbatches": 4, "fill": 0.755}, "ratio_tokens_per_s": 0.95, "ratio_cpu_time": 0.97,
               "step0_loss_packed": 6.2, "step0_loss_padded": 6.2, "goal_ratio": 1.0}
    goals = []
    lines = ra._md_packing(figures, goals)
    assert "| padded | 4 | 4651 | 75.5% | 75.7% | 0.80 | 5722.0 |" in lines
    assert goals == [("packed vs padded training step, long-tailed rows, tiny (tokens/s ratio)", "0.950", ">= 1",
                      "missed by 5%")]
