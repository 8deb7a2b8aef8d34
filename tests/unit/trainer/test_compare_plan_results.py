"""compare's plan (equal budgets, two-stage runs, refused overrides), its resumability checks,
and its table and curves against numbers computed here from synthetic runs."""

from __future__ import annotations

import json
import statistics

import pytest
import yaml

from megatron_hpt.config import apply_overrides, config_to_dict, load_recipe
from megatron_hpt.eval import BenchmarkResult, EvalRun
from megatron_hpt.trainer.compare.command import dry_run_text
from megatron_hpt.trainer.compare.execute import check_same_config, config_differences, stage_finished
from megatron_hpt.trainer.compare.plan import CompareSpec, merge_overrides, plan_comparison
from megatron_hpt.trainer.compare.results import build_table, mean_curves, run_curves


def _spec(tmp_path, **kw) -> CompareSpec:
    defaults = dict(recipe="demo-cpu", algorithms=("hpt", "sft", "sft_then_grpo"), num_seeds=2,
                    output_dir=str(tmp_path / "cmp"), overrides=("train.steps=9",))
    return CompareSpec(**{**defaults, **kw})


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def test_every_run_gets_the_recipes_budget_and_differs_only_in_algorithm_and_seed(tmp_path):
    plan = plan_comparison(_spec(tmp_path))
    assert [(r.algorithm, r.seed) for r in plan.runs] == [
        ("hpt", 1234), ("hpt", 1235), ("sft", 1234), ("sft", 1235), ("sft_then_grpo", 1234), ("sft_then_grpo", 1235)]
    base = _flat(config_to_dict(plan.base))
    allowed = {"algorithm.preset", "seed", "name", "output_dir"}
    two_stage = {"train.steps", "checkpoint.init_megatron", "checkpoint.init_data_from"}
    for run in plan.runs:
        assert sum(s.steps for s in run.stages) == 9
        for stage in run.stages:
            cfg = _flat(config_to_dict(plan.stage_config(stage)))
            differ = {k for k in base if cfg[k] != base[k]}
            assert differ <= allowed | (two_stage if len(run.stages) == 2 else set()), differ
            assert cfg["seed"] == run.seed and cfg["algorithm.preset"] == stage.preset
            assert cfg["checkpoint.export_hf"] is True
    one, two = plan.runs[4].stages
    assert (one.preset, one.steps, two.preset, two.steps) == ("sft", 4, "grpo", 5)  # round(0.5 * 9) = 4
    assert (one.step_offset, two.step_offset) == (0, 4)
    cfg2 = plan.stage_config(two)
    assert cfg2.checkpoint.init_megatron == str(one.run_dir / "checkpoints" / "step_000004" / "weights")
    assert cfg2.checkpoint.init_data_from == str(one.run_dir / "checkpoints" / "step_000004")
    assert len({s.run_dir for s in plan.stages()}) == len(plan.stages()) == 8


@pytest.mark.parametrize("fraction, steps, first", [(0.5, 2, 1), (0.1, 9, 1), (0.99, 9, 8), (0.25, 100, 25)])
def test_first_stage_share_leaves_each_stage_a_step(tmp_path, fraction, steps, first):
    plan = plan_comparison(_spec(tmp_path, algorithms=("sft_then_grpo",), num_seeds=1,
                                 overrides=(f"train.steps={steps}",), first_stage_fraction=fraction))
    assert [s.steps for s in plan.runs[0].stages] == [first, steps - first]


def test_bad_requests_fail_before_anything_runs(tmp_path):
    with pytest.raises(ValueError, match="seed"):
        _spec(tmp_path, overrides=("seed=3",))
    with pytest.raises(ValueError, match="algorithm.preset"):
        _spec(tmp_path, overrides=("algorithm.preset=grpo",))
    with pytest.raises(ValueError, match="listed more than once"):
        _spec(tmp_path, algorithms=("hpt", "hpt"))
    with pytest.raises(ValueError, match=r"nope.*known: .*grpo"):
        plan_comparison(_spec(tmp_path, algorithms=("hpt", "sft_then_nope")))
    with pytest.raises(ValueError, match="PRESET_then_PRESET"):
        plan_comparison(_spec(tmp_path, algorithms=("sft_then_grpo_then_hpt",)))
    with pytest.raises(ValueError, match="train.steps >= 2"):
        plan_comparison(_spec(tmp_path, overrides=("train.steps=1",)))
    with pytest.raises(ValueError, match="eval_every > 0"):
        plan_comparison(_spec(tmp_path, overrides=("eval_every=0",)))
    with pytest.raises(ValueError, match="train.not_a_key"):
        plan_comparison(_spec(tmp_path, overrides=("train.not_a_key=1",)))


def test_per_preset_settings_of_the_recipe_are_cleared(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("base: demo-cpu\nalgorithm: {preset: hpt, rows: switch, overrides: {entropy_coef: 0.0}}\n")
    plan = plan_comparison(_spec(tmp_path, recipe=str(recipe), algorithms=("sft",), num_seeds=1))
    cfg = plan.stage_config(plan.runs[0].stages[0])
    assert cfg.algorithm.rows == "auto" and cfg.algorithm.overrides == {}
    # ... but a change on the command line applies to every run
    plan = plan_comparison(_spec(tmp_path, recipe=str(recipe), algorithms=("sft",), num_seeds=1,
                                 overrides=("algorithm.overrides.entropy_coef=0.01",)))
    assert plan.stage_config(plan.runs[0].stages[0]).algorithm.overrides == {"entropy_coef": 0.01}


@pytest.mark.parametrize("items", [
    ["a.b=1", "a.c=2", "a.b=3"],
    ["a.b=1", "a={x: 1}", "a.b=2", "a.x=5"],
    ["a={b: 1, c: 2}", "a.c=4", "a={b: 9}", "d=1", "d=2"],
])
def test_merged_overrides_apply_the_same(items):
    merged = merge_overrides(items)
    assert len(merged) < len(items)
    assert apply_overrides({}, list(merged)) == apply_overrides({}, items)


def test_a_run_dir_with_another_config_is_refused(tmp_path):
    plan = plan_comparison(_spec(tmp_path, algorithms=("hpt",), num_seeds=1))
    stage = plan.runs[0].stages[0]
    cfg = plan.stage_config(stage)
    stage.run_dir.mkdir(parents=True)
    saved = config_to_dict(cfg)
    (stage.run_dir / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    check_same_config(stage.run_dir, cfg)  # same: fine
    saved["train"]["step"]["optimizer"]["lr"] = 1.0
    saved["rollout"]["n"] = 3
    (stage.run_dir / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    with pytest.raises(RuntimeError, match=r"rollout\.n, train\.step\.optimizer\.lr"):
        check_same_config(stage.run_dir, cfg)
    assert config_differences({"a": {"b": 1}}, {"a": {"b": 1, "c": 2}}) == ["a.c"]


def test_a_stage_is_finished_only_with_its_last_checkpoint_export_and_eval(tmp_path):
    plan = plan_comparison(_spec(tmp_path, algorithms=("hpt",), num_seeds=1))
    stage = plan.runs[0].stages[0]
    cfg = plan.stage_config(stage)
    ckpts = stage.run_dir / "checkpoints"
    (ckpts / "step_000008" / "weights").mkdir(parents=True)
    (ckpts / "latest").write_text("step_000008")
    (stage.run_dir / "final_hf").mkdir()
    (stage.run_dir / "final_hf" / "config.json").write_text("{}")
    (stage.run_dir / "eval").mkdir()
    (stage.run_dir / "eval" / "eval_report.json").write_text("{}")
    assert not stage_finished(stage, cfg)  # step 8 of 9
    (ckpts / "step_000009").mkdir()
    (ckpts / "latest").write_text("step_000009")
    assert stage_finished(stage, cfg)
    (stage.run_dir / "eval" / "eval_report.json").unlink()
    assert not stage_finished(stage, cfg)


def _run(model: str, scores: dict[str, float]) -> EvalRun:
    return EvalRun(model, {
        name: BenchmarkResult(name=name, num_problems=10, num_samples=1, avg_at_k=v, pass_at_k={1: v},
                              zero_reasons={}, finish_reasons={}, mean_response_tokens=5.0, correct_per_problem=[])
        for name, v in scores.items()
    })


def test_table_is_mean_and_sample_std_over_seeds_in_the_papers_layout():
    scores = {
        ("hpt", 1): {"aime24": 0.30, "amc": 0.70, "arith": 0.5, "gpqa": 0.40},
        ("hpt", 2): {"aime24": 0.36, "amc": 0.64, "arith": 0.7, "gpqa": 0.44},
        ("hpt", 3): {"aime24": 0.33, "amc": 0.61, "arith": 0.6, "gpqa": 0.42},
        ("grpo", 1): {"aime24": 0.20, "amc": 0.60, "arith": 0.1, "gpqa": 0.30},
        ("grpo", 2): {"aime24": 0.26, "amc": 0.50, "arith": 0.3, "gpqa": 0.34},
    }
    table = build_table({k: _run("x", v) for k, v in scores.items()}, ["hpt", "grpo"])
    # paper benchmarks, Avg over them, then out-of-distribution, then others
    assert table.columns == ["aime24", "amc", "avg", "gpqa", "arith"]
    assert table.titles[:3] == ["AIME24", "AMC", "Avg"]
    for row in table.rows:
        seeds = sorted(s for a, s in scores if a == row.algorithm)
        assert row.seeds == seeds
        for col in ("aime24", "amc", "gpqa", "arith"):
            vals = [100 * scores[(row.algorithm, s)][col] for s in seeds]
            assert row.mean[col] == pytest.approx(statistics.fmean(vals))
            assert row.std[col] == pytest.approx(statistics.stdev(vals))
        avgs = [50 * (scores[(row.algorithm, s)]["aime24"] + scores[(row.algorithm, s)]["amc"]) for s in seeds]
        assert row.mean["avg"] == pytest.approx(statistics.fmean(avgs))
        assert row.std["avg"] == pytest.approx(statistics.stdev(avgs))
    md = table.to_markdown()
    assert md.splitlines()[0] == "| Algorithm | AIME24 | AMC | Avg | GPQA | arith |"
    hpt_line = next(line for line in md.splitlines() if line.startswith("| HPT |"))
    assert "**33.0 ± 3.0**" in hpt_line  # the best mean of its column is bold
    grpo_line = next(line for line in md.splitlines() if line.startswith("| GRPO |"))
    assert "23.0 ± 4.2" in grpo_line and "**" not in grpo_line


def test_without_paper_benchmarks_avg_is_the_mean_of_the_columns():
    table = build_table({("sft", 1): _run("a", {"x": 0.2, "y": 0.4})}, ["sft"])
    assert table.columns == ["x", "y", "avg"]
    assert table.rows[0].mean["avg"] == pytest.approx(30.0)
    assert table.rows[0].std["avg"] is None
    assert "| SFT | 20.0 | 40.0 | 30.0 |" in table.to_markdown()


def test_two_stage_curves_share_one_step_axis(tmp_path):
    plan = plan_comparison(_spec(tmp_path, algorithms=("sft_then_grpo",), num_seeds=1,
                                 overrides=("train.steps=4",)))
    run = plan.runs[0]
    one, two = run.stages
    rows1 = [{"step": 0, "eval/accuracy": 0.0}, {"step": 1, "actor/entropy": 3.0},
             {"step": 2, "actor/entropy": 2.0, "eval/accuracy": 0.5}]
    rows2 = [{"step": 0, "eval/accuracy": 0.5}, {"step": 1, "actor/entropy": 2.5},
             {"step": 2, "actor/entropy": 2.4, "eval/accuracy": 0.75}]
    for stage, rows in ((one, rows1), (two, rows2)):
        stage.run_dir.mkdir(parents=True)
        (stage.run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    records = run_curves(run)
    assert [r["step"] for r in records] == [0, 1, 2, 3, 4]
    curves = mean_curves({("sft_then_grpo", 1): records, ("sft_then_grpo", 2): [
        {"step": 2, "eval/accuracy": 0.25}]}, ["sft_then_grpo"])["sft_then_grpo"]
    assert curves["actor/entropy"]["step"] == [1, 2, 3, 4]
    assert curves["actor/entropy"]["mean"] == [3.0, 2.0, 2.5, 2.4]
    assert curves["eval/accuracy"]["step"] == [0, 2, 4]
    assert curves["eval/accuracy"]["mean"] == pytest.approx([0.0, 0.375, 0.75])
    assert curves["eval/accuracy"]["num_seeds"] == [1, 2, 1]


def test_dry_run_lists_a_runnable_command_per_stage_in_order(tmp_path):
    plan = plan_comparison(_spec(tmp_path, algorithms=("grpo", "sft_then_grpo"), num_seeds=1, pass_k_samples=4))
    text = dry_run_text(plan, ["--recipe", "demo-cpu", "--dry-run"])
    commands = [line for line in text.splitlines() if not line.startswith("#")]
    assert len(commands) == 3 + 2  # three stages, two pass@k evaluations
    assert all(c.startswith("megatron-hpt train --recipe demo-cpu --resume ") for c in commands[:3])
    assert "stage1-sft" in commands[1] and "init_megatron=" in commands[2] and "stage1-sft" in commands[2]
    assert all(c.startswith("megatron-hpt eval --recipe demo-cpu --model ") for c in commands[3:])
    assert "'eval.pass_k=[1, 2, 3, 4]'" in commands[3]
    assert "megatron-hpt compare --recipe demo-cpu\n" in text  # the command to run afterwards
    assert not list(tmp_path.glob("cmp/**/*"))  # a dry run writes nothing
    # the stage-2 command applies exactly like the plan's config
    recipe = load_recipe("demo-cpu")
    args = commands[2].split()[5:]
    assert apply_overrides(recipe, args)["checkpoint"]["init_megatron"] == str(
        plan.runs[1].stages[0].final_checkpoint / "weights")


def test_jobs_run_k_at_a_time_after_their_dependencies_and_failures_propagate(tmp_path):
    import sys

    from megatron_hpt.trainer.compare.execute import Job, run_jobs

    # Each job appends "start name t" / "end name t" to a shared file and creates name.done
    # (or exits 3); the runner starts ``python -c SCRIPT name seconds rc``.
    script = (
        "import sys, time, pathlib; d = pathlib.Path(sys.argv[1]); name, secs, rc = sys.argv[2], float(sys.argv[3]), "
        "int(sys.argv[4]); log = d / 'events'; log.open('a').write(f'start {name} {time.time()}\\n'); "
        "time.sleep(secs); log.open('a').write(f'end {name} {time.time()}\\n'); "
        "rc or (d / f'{name}.done').touch(); sys.exit(rc)"
    )

    def job(name, secs=0.3, rc=0, after=None, claims_done=False):
        j = Job(label=name, argv=[str(tmp_path), name, str(secs), str(rc)], log=tmp_path / "logs" / f"{name}.log",
                finished=lambda: claims_done or (tmp_path / f"{name}.done").is_file(), after=after)
        j.done = j.finished()
        return j

    a = job("a")
    b = job("b", after=a)
    c = job("c", rc=3)
    d = job("d", after=c)  # never runs: c fails
    e = job("e", claims_done=True)  # finished earlier: skipped
    f = job("f", secs=0.0)
    g = job("g", claims_done=False)
    g.finished = lambda: False  # exits 0 without its outputs: a failure
    failed = run_jobs([a, b, c, d, e, f, g], parallel=2, poll_s=0.05, program=(sys.executable, "-c", script))
    assert {j.label for j in failed} == {"c", "d", "g"}
    assert (c.returncode, d.returncode, g.returncode) == (3, -1, -2)
    events = [line.split() for line in (tmp_path / "events").read_text().splitlines()]
    started = [name for kind, name, _ in events if kind == "start"]
    assert sorted(started) == ["a", "b", "c", "f", "g"]
    t = {(kind, name): float(ts) for kind, name, ts in events}
    assert t[("start", "b")] >= t[("end", "a")]
    # never more than two at a time
    timeline = sorted((float(ts), 1 if kind == "start" else -1) for kind, _, ts in events)
    running = peak = 0
    for _, delta in timeline:
        running += delta
        peak = max(peak, running)
    assert peak == 2
    assert "=== " in (tmp_path / "logs" / "a.log").read_text()


def test_the_cpu_comparison_starts_from_its_base_runs_final_checkpoint():
    from pathlib import Path

    from megatron_hpt.trainer.config import load_run_config

    base, cmp = load_run_config("compare-cpu-base"), load_run_config("compare-cpu")
    assert base.algorithm.preset == "sft" and base.model.hf_path == cmp.model.hf_path
    assert Path(cmp.checkpoint.init_megatron) == Path(base.output_dir) / "checkpoints" / f"step_{base.train.steps:06d}" / "weights"
    assert base.checkpoint.every == base.train.steps or base.train.steps % base.checkpoint.every == 0
    assert cmp.algorithm.constant_normalizer == cmp.rollout.max_new_tokens  # the paper's: the longest response
