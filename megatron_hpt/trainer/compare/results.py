"""A comparison's results: each final model's held-out scores, the paper-layout table
(rows = algorithms, columns = benchmarks + Avg, mean ± std over seeds), learning
curves averaged over seeds, and pass@k of the final models.

Sources, per run: the trainer's evaluation of its final step (``eval/eval_report.json``,
the row ``<name>@<steps>``), its ``metrics.jsonl`` (curves; a two-stage run's second
stage continues the first's step axis), and its pass@k evaluation
(``pass_at_k/eval/eval_report.json``). Std is the sample standard deviation over seeds
(ddof 1); with one seed there is none.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from megatron_hpt.eval import EvalRun, build_report
from megatron_hpt.trainer.compare.plan import ComparePlan, PlannedRun, display_name
from megatron_hpt.trainer.metrics_log import read_metrics

AVG = "avg"
# Curves of the comparison plot: metric key -> panel title.
CURVES = {
    "eval/accuracy": "Held-out accuracy",
    "rollout/accuracy": "Rollout accuracy (training prompts)",
    "actor/entropy": "Token entropy",
    "hpt/sft_prompt_frac": "SFT fraction of prompts",
}


def _eval_report_run(report: Path, model: str | None = None) -> EvalRun:
    """One row of an eval_report.json (``details[model]``; the only row when model is None)."""
    if not report.is_file():
        raise FileNotFoundError(f"{report} is missing: the run did not finish its evaluation")
    details = json.loads(report.read_text())["details"]
    if model is None:
        if len(details) != 1:
            raise ValueError(f"{report}: expected one evaluated model, found {sorted(details)}")
        model = next(iter(details))
    if model not in details:
        raise KeyError(f"{report} has no evaluation of {model!r} (it has {', '.join(details)})")
    return EvalRun.from_dict({"model": model, "results": details[model]})


def final_eval(plan: ComparePlan, run: PlannedRun) -> EvalRun:
    """The trainer's held-out evaluation at the run's last step."""
    cfg = plan.stage_config(run.final)
    return _eval_report_run(run.final.run_dir / "eval" / "eval_report.json", f"{cfg.name}@{run.final.steps}")


def run_curves(run: PlannedRun) -> list[dict]:
    """metrics.jsonl records of every stage on one step axis (a later stage's step-0
    evaluation repeats the previous stage's last one and is dropped)."""
    records: list[dict] = []
    for stage in run.stages:
        for r in read_metrics(stage.run_dir / "metrics.jsonl"):
            if stage.previous is not None and r["step"] == 0:
                continue
            records.append({**r, "step": r["step"] + stage.step_offset})
    return records


def _mean_std(values: list[float]) -> tuple[float, float | None]:
    mean = sum(values) / len(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else None)


@dataclass
class AlgorithmRow:
    algorithm: str
    display: str
    seeds: list[int]
    per_seed: dict[int, dict[str, float | None]]
    """Seed -> column -> score in percent."""
    mean: dict[str, float | None] = field(default_factory=dict)
    std: dict[str, float | None] = field(default_factory=dict)


@dataclass
class ComparisonTable:
    columns: list[str]
    titles: list[str]
    rows: list[AlgorithmRow]

    def to_markdown(self, digits: int = 1) -> str:
        best = {}
        for c in self.columns:
            means = [r.mean.get(c) for r in self.rows if r.mean.get(c) is not None]
            best[c] = max(means) if len(means) > 1 else None
        lines = ["| Algorithm | " + " | ".join(self.titles) + " |", "|---|" + "---|" * len(self.columns)]
        for row in self.rows:
            cells = []
            for c in self.columns:
                m, s = row.mean.get(c), row.std.get(c)
                if m is None:
                    cells.append("-")
                    continue
                text = f"{m:.{digits}f}" + (f" ± {s:.{digits}f}" if s is not None else "")
                cells.append(f"**{text}**" if best[c] is not None and round(m, digits) == round(best[c], digits) else text)
            lines.append(f"| {row.display} | " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"

    def to_dict(self) -> dict:
        return {
            "columns": self.columns,
            "titles": self.titles,
            "rows": [
                {"algorithm": r.algorithm, "display": r.display, "seeds": r.seeds, "mean": r.mean, "std": r.std,
                 "per_seed": {str(s): v for s, v in r.per_seed.items()}}
                for r in self.rows
            ],
        }


def build_table(evals: dict[tuple[str, int], EvalRun], algorithms: list[str]) -> ComparisonTable:
    """Scores in percent per algorithm x seed, then mean ± std over seeds. Columns follow the
    eval report (the paper's benchmarks, Avg, out-of-distribution, others); when none of
    the paper's six is present, Avg is the mean over all the benchmarks shown."""
    labelled = {key: EvalRun(f"{key[0]}/seed{key[1]}", run.results) for key, run in evals.items()}
    report = build_report(list(labelled.values()))
    layout = report.to_dict()
    columns, titles = list(layout["columns"]), list(layout["titles"])
    own_avg = AVG not in columns
    if own_avg:
        columns.append(AVG)
        titles.append("Avg")
    rows = []
    for algorithm in algorithms:
        seeds = sorted(seed for (a, seed) in labelled if a == algorithm)
        per_seed: dict[int, dict[str, float | None]] = {}
        for seed in seeds:
            run = labelled[(algorithm, seed)]
            values = {c: report.value(run, c) for c in columns if c != AVG or not own_avg}
            if own_avg:
                shown = [v for c, v in values.items()]
                values[AVG] = sum(shown) / len(shown) if shown and None not in shown else None
            per_seed[seed] = values
        row = AlgorithmRow(algorithm, display_name(algorithm), seeds, per_seed)
        for c in columns:
            vals = [per_seed[s][c] for s in seeds]
            if vals and None not in vals:
                row.mean[c], row.std[c] = _mean_std(vals)
            else:
                row.mean[c], row.std[c] = None, None
        rows.append(row)
    return ComparisonTable(columns, titles, rows)


def mean_curves(curves: dict[tuple[str, int], list[dict]], algorithms: list[str]) -> dict[str, dict[str, dict]]:
    """algorithm -> metric -> {"step": [...], "mean": [...], "std": [...], "num_seeds": [...]}:
    at each step, over the seeds that logged the metric there."""
    out: dict[str, dict[str, dict]] = {}
    for algorithm in algorithms:
        runs = [records for (a, _), records in sorted(curves.items()) if a == algorithm]
        per_metric = {}
        for key in CURVES:
            by_step: dict[int, list[float]] = {}
            for records in runs:
                for r in records:
                    v = r.get(key)
                    if isinstance(v, (int, float)) and math.isfinite(v):
                        by_step.setdefault(r["step"], []).append(float(v))
            steps = sorted(by_step)
            stats = [_mean_std(by_step[s]) for s in steps]
            per_metric[key] = {
                "step": steps,
                "mean": [m for m, _ in stats],
                "std": [s for _, s in stats],
                "num_seeds": [len(by_step[s]) for s in steps],
            }
        out[algorithm] = per_metric
    return out


def mean_pass_at_k(passk: dict[tuple[str, int], EvalRun], algorithms: list[str]) -> dict[str, dict[str, dict]]:
    """algorithm -> benchmark -> {"k": [...], "mean": [...] (percent), "std": [...]}."""
    out: dict[str, dict[str, dict]] = {}
    for algorithm in algorithms:
        runs = [run for (a, _), run in sorted(passk.items()) if a == algorithm]
        benches: dict[str, dict] = {}
        for name in (runs[0].results if runs else {}):
            ks = sorted(set.intersection(*(set(r.results[name].pass_at_k) for r in runs)))
            stats = [_mean_std([100.0 * r.results[name].pass_at_k[k] for r in runs]) for k in ks]
            benches[name] = {"k": ks, "mean": [m for m, _ in stats], "std": [s for _, s in stats]}
        out[algorithm] = benches
    return out


@dataclass
class ComparisonResults:
    table: ComparisonTable
    curves: dict
    pass_at_k: dict
    budget: dict
    missing: list[str]
    """Runs (algorithm/seed) without results: not finished, or failed."""
    pass_k_settings: dict

    def to_dict(self) -> dict:
        return {
            "table": self.table.to_dict(),
            "budget": self.budget,
            "pass_at_k": self.pass_at_k,
            "pass_at_k_settings": self.pass_k_settings,
            "curves": self.curves,
            "missing": self.missing,
        }


def collect(plan: ComparePlan) -> ComparisonResults:
    """Read every finished run's results; runs that lack them are listed in ``missing``."""
    algorithms = list(plan.spec.algorithms)
    evals: dict[tuple[str, int], EvalRun] = {}
    curves: dict[tuple[str, int], list[dict]] = {}
    passk: dict[tuple[str, int], EvalRun] = {}
    missing = []
    for run in plan.runs:
        key = (run.algorithm, run.seed)
        try:
            evals[key] = final_eval(plan, run)
            curves[key] = run_curves(run)
        except (FileNotFoundError, KeyError) as e:
            missing.append(f"{run.label}: {e}")
            continue
        report = run.final.run_dir / "pass_at_k" / "eval" / "eval_report.json"
        if plan.spec.pass_k_samples and report.is_file():
            passk[key] = _eval_report_run(report)
    base = plan.base
    per_step_prompts = base.train.rollout_batch_size
    budget = {
        "steps": base.train.steps,
        "prompts_per_step": per_step_prompts,
        "rollouts_per_prompt": base.rollout.n,
        "prompts_seen": base.train.steps * per_step_prompts,
        "rollouts_generated": base.train.steps * per_step_prompts * base.rollout.n,
        "optimizer_steps_per_step": base.train.minibatches_per_step,
        "seeds": plan.seeds,
        "first_stage_fraction": plan.spec.first_stage_fraction,
        # What the runs actually logged: training steps and summed step time per algorithm.
        "logged_steps": {
            a: sorted({sum(1 for r in recs if "timing/step" in r) for (alg, _), recs in curves.items() if alg == a})
            for a in algorithms
        },
        "train_minutes_mean": {
            a: _mean_or_none([sum(r.get("timing/step", 0.0) for r in recs) / 60
                              for (alg, _), recs in curves.items() if alg == a])
            for a in algorithms
        },
    }
    algorithms_with_results = [a for a in algorithms if any(k[0] == a for k in evals)]
    return ComparisonResults(
        table=build_table(evals, algorithms_with_results),
        curves=mean_curves(curves, algorithms_with_results),
        pass_at_k=mean_pass_at_k(passk, [a for a in algorithms_with_results if any(k[0] == a for k in passk)]),
        budget=budget,
        missing=missing,
        pass_k_settings={"num_samples": plan.spec.pass_k_samples, "temperature": plan.pass_k_temperature,
                         "top_p": base.rollout.top_p},
    )


def _mean_or_none(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def pass_at_k_markdown(pass_at_k: dict, ks: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)) -> str:
    """One table per benchmark: rows = algorithms, columns = pass@k for k in ``ks`` (<= n)."""
    benches = sorted({b for per in pass_at_k.values() for b in per})
    parts = []
    for bench in benches:
        shown = sorted({k for per in pass_at_k.values() for k in per.get(bench, {}).get("k", []) if k in ks})
        lines = [f"pass@k on {bench} (%, mean over seeds):", "",
                 "| Algorithm | " + " | ".join(f"k={k}" for k in shown) + " |", "|---|" + "---|" * len(shown)]
        for algorithm, per in pass_at_k.items():
            data = per.get(bench)
            if not data:
                continue
            value = dict(zip(data["k"], data["mean"]))
            lines.append(f"| {display_name(algorithm)} | " + " | ".join(
                f"{value[k]:.1f}" if k in value else "-" for k in shown) + " |")
        parts.append("\n".join(lines) + "\n")
    return "\n".join(parts)
