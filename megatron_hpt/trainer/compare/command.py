"""``megatron-hpt compare``: train several algorithms on one recipe's budget, evaluate
them, and write the paper-layout table, learning curves and pass@k curves.

    megatron-hpt compare --recipe compare-cpu --algorithms hpt,sft,grpo,sft_then_grpo,luffy,srft \\
        --seeds 3 --output-dir runs/compare --parallel 2 [dotted.key=value ...]

Writes, under the output directory: ``comparison.md`` and ``comparison.json`` (the
table, the budget, pass@k, the curves' numbers), ``learning_curves.png``,
``pass_at_k.png``, ``commands.txt`` (every job's command line) and ``runs/`` (each
run's own directory). Running the same command again skips finished runs and resumes
unfinished ones; ``--dry-run`` prints the commands (for SLURM or by hand) instead.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from megatron_hpt.trainer.compare.execute import comparison_jobs, run_jobs
from megatron_hpt.trainer.compare.plan import (
    CompareSpec,
    ComparePlan,
    display_name,
    eval_argv,
    plan_comparison,
    shell_line,
    train_argv,
)
from megatron_hpt.trainer.compare.results import ComparisonResults, collect, pass_at_k_markdown

DEFAULT_ALGORITHMS = "hpt,sft,grpo,sft_then_grpo,luffy,srft"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="megatron-hpt compare", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--recipe", required=True, help="recipe name (megatron_hpt/recipes) or YAML path, shared by every run")
    p.add_argument("--algorithms", default=DEFAULT_ALGORITHMS,
                   help=f"comma-separated loss presets or A_then_B two-stage runs (default {DEFAULT_ALGORITHMS})")
    p.add_argument("--seeds", type=int, default=3, help="seeds per algorithm: the recipe's seed, +1, ... (default 3)")
    p.add_argument("--output-dir", default="runs/compare", help="where the runs and the results go")
    p.add_argument("--parallel", type=int, default=1,
                   help="training/eval processes at a time, each with cores/K torch threads (default 1)")
    p.add_argument("--first-stage-fraction", type=float, default=0.5,
                   help="share of the steps given to the first stage of A_then_B runs (default 0.5)")
    p.add_argument("--pass-k-samples", type=int, default=16,
                   help="samples per held-out prompt for the pass@k curves of the final models (k = 1..n); 0 skips")
    p.add_argument("--pass-k-temperature", type=float, default=None,
                   help="sampling temperature of the pass@k evaluation (default: the recipe's rollout temperature)")
    p.add_argument("--dry-run", action="store_true", help="print the command of every job and exit")
    p.add_argument("overrides", nargs="*", help="dotted.key=value changes to the recipe, for every run")
    return p


def spec_from_args(args: argparse.Namespace) -> CompareSpec:
    return CompareSpec(
        recipe=args.recipe,
        algorithms=tuple(a.strip() for a in args.algorithms.split(",") if a.strip()),
        num_seeds=args.seeds,
        output_dir=args.output_dir,
        overrides=tuple(args.overrides),
        first_stage_fraction=args.first_stage_fraction,
        pass_k_samples=args.pass_k_samples,
        pass_k_temperature=args.pass_k_temperature,
    )


def job_commands(plan: ComparePlan) -> list[str]:
    """Every job's command line, in an order that runs (a first stage before its second)."""
    lines = []
    for stage in plan.stages():
        lines.append(shell_line(train_argv(plan.spec.recipe, stage)))
    if plan.spec.pass_k_samples and plan.base.eval.benchmarks:
        for run in plan.runs:
            lines.append(shell_line(eval_argv(plan.spec.recipe, run.final.run_dir / "final_hf",
                                              plan.pass_k_overrides(run))))
    return lines


def dry_run_text(plan: ComparePlan, argv: list[str]) -> str:
    two_stage = [r for r in plan.runs if len(r.stages) > 1]
    note = [
        f"# {len(plan.stages())} training jobs ({len(plan.runs)} runs: "
        f"{', '.join(display_name(a) for a in plan.spec.algorithms)} x {len(plan.seeds)} seeds {plan.seeds}),",
        f"# {plan.base.train.steps} steps x {plan.base.train.rollout_batch_size} prompts x {plan.base.rollout.n} "
        "rollouts each; then one pass@k evaluation per final model.",
        "# Each line is independent except: a stage2 line needs its stage1 line finished (it starts",
        "# from stage1's final checkpoint), and an eval line needs its run's final_hf.",
        "# On SLURM, one job per train line, e.g. (the train_* scripts in launchers/slurm):",
        "#   sbatch --export=ALL,RECIPE=<recipe>,OUTPUT_DIR=<output_dir of the line>,OVERRIDES=\"<the other",
        "#     overrides>\" launchers/slurm/train_single_node.sbatch",
        "# with --dependency=afterok:<stage1 job id> for stage2 lines. Every train line has --resume,",
        "# so a requeued job continues from its checkpoint.",
        "# Afterwards, the same compare command without --dry-run skips the finished runs, runs the",
        "# evaluations not done yet and writes the table and plots:",
        "#   megatron-hpt compare " + " ".join(a for a in argv if a != "--dry-run"),
    ]
    if two_stage:
        note.insert(2, f"# {display_name(two_stage[0].algorithm)}: stage 1 trains {two_stage[0].stages[0].steps} steps, "
                       f"stage 2 the other {two_stage[0].stages[1].steps}.")
    return "\n".join(note + job_commands(plan)) + "\n"


def write_results(plan: ComparePlan, results: ComparisonResults, out: Path, wall_s: float | None) -> Path:
    from megatron_hpt.trainer.compare.plots import plot_learning_curves, plot_pass_at_k

    out.mkdir(parents=True, exist_ok=True)
    title = (f"{plan.base.name}: {plan.base.train.steps} steps x {plan.base.train.rollout_batch_size} prompts x "
             f"{plan.base.rollout.n} rollouts, mean over {len(plan.seeds)} seed(s)")
    plot_learning_curves(results.curves, out / "learning_curves.png", title)
    if results.pass_at_k:
        s = results.pass_k_settings
        plot_pass_at_k(results.pass_at_k, out / "pass_at_k.png",
                       f"pass@k of the final models: {s['num_samples']} samples, T {s['temperature']}, "
                       f"top_p {s['top_p']}, mean over seeds")
    b = results.budget
    lines = [
        f"# Algorithm comparison: {plan.spec.recipe}",
        "",
        f"Same budget for every algorithm: {b['steps']} steps x {b['prompts_per_step']} prompts x "
        f"{b['rollouts_per_prompt']} rollouts ({b['prompts_seen']} prompts seen, {b['rollouts_generated']} rollouts, "
        f"{b['optimizer_steps_per_step']} optimizer step(s) per step); seeds {b['seeds']}. "
        "Scores: held-out avg@k at the last step (the recipe's eval settings), %, mean ± std over seeds.",
        "",
        results.table.to_markdown(),
        "![learning curves](learning_curves.png)",
        "",
    ]
    if results.pass_at_k:
        s = results.pass_k_settings
        lines += [f"pass@k of the final models ({s['num_samples']} samples per prompt, temperature {s['temperature']}, "
                  f"top_p {s['top_p']}):", "", pass_at_k_markdown(results.pass_at_k), "![pass@k](pass_at_k.png)", ""]
    minutes = b["train_minutes_mean"]
    lines += ["| Algorithm | training steps logged | train time per run (min, sum of step times) |", "|---|---|---|"]
    for a in results.table.rows:
        m = minutes.get(a.algorithm)
        lines.append(f"| {a.display} | {', '.join(map(str, b['logged_steps'][a.algorithm]))} | "
                     f"{'-' if m is None else f'{m:.1f}'} |")
    lines.append("")
    if wall_s is not None:
        lines += [f"Wall time of this invocation: {wall_s / 60:.1f} min.", ""]
    if results.missing:
        lines += ["Runs without results:", "", *[f"- {m}" for m in results.missing], ""]
    md = out / "comparison.md"
    md.write_text("\n".join(lines))
    data = results.to_dict()
    data["command"] = {"recipe": plan.spec.recipe, "algorithms": list(plan.spec.algorithms),
                       "overrides": list(plan.spec.overrides), "wall_s": wall_s}
    (out / "comparison.json").write_text(json.dumps(data, indent=2) + "\n")
    return md


def main(argv: list[str] | None = None) -> int:
    argv = list(argv or [])
    args = build_parser().parse_args(argv)
    if args.parallel < 1:
        raise SystemExit("--parallel must be >= 1")
    try:
        plan = plan_comparison(spec_from_args(args))
    except ValueError as e:
        raise SystemExit(f"megatron-hpt compare: {e}") from None
    if args.dry_run:
        print(dry_run_text(plan, argv), end="")
        return 0
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "commands.txt").write_text("\n".join(job_commands(plan)) + "\n")
    start = time.perf_counter()
    try:
        jobs = comparison_jobs(plan)
    except RuntimeError as e:
        raise SystemExit(f"megatron-hpt compare: {e}") from None
    print(f"[compare] {len(jobs)} jobs ({len(plan.stages())} training stages, {len(jobs) - len(plan.stages())} "
          f"pass@k evaluations; {sum(j.done for j in jobs)} finished earlier), {args.parallel} at a time", flush=True)
    failed = run_jobs(jobs, args.parallel)
    wall = time.perf_counter() - start
    results = collect(plan)
    md = write_results(plan, results, out, wall)
    print(results.table.to_markdown())
    print(f"[compare] results in {md} ({wall / 60:.1f} min)", flush=True)
    if failed:
        print("[compare] failed jobs:\n" + "\n".join(f"  {j.label}: {j.log}" for j in failed), flush=True)
        return 1
    return 0

