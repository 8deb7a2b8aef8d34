"""Every benchmark in one run: ``benchmarks/results/<date>-<device>.md`` and ``.json``.

    python benchmarks/run_all.py [--quick] [--only train_step,peer_trl]     # or: make bench

Each benchmark module exposes ``run(quick) -> dict``; this script runs them one after the
other in this order, records the machine's load average before and after each (the
machines are shared: ratios inside one benchmark are measured side by side, absolute
figures move with the load), and writes the figures as JSON plus a markdown summary with
every goal, met or missed and by how much. A benchmark that fails is recorded with its
error and the others still run. ``--quick`` (smaller sizes, about 3 minutes instead of 16 on
2 cores) writes ``<date>-<device>-quick.*``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import json
import os
import platform
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

# before torch is imported anywhere in this process (see train_step.OMP_WAIT_POLICY)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"


@dataclass(frozen=True)
class Benchmark:
    key: str
    module: str
    title: str


BENCHMARKS = (
    Benchmark("train_step", "benchmarks.train_step", "Training step: ours vs plain HF transformers + PyTorch, CPU roofline"),
    Benchmark("packing", "benchmarks.packing", "Sequence packing vs padding: training step on long-tailed rows"),
    Benchmark("peer_trl", "benchmarks.peer_trl", "Peers: TRL GRPOTrainer and SFTTrainer on the same work"),
    Benchmark("hpt_step", "benchmarks.hpt_step", "End-to-end HPT step on the demo recipe, by phase"),
    Benchmark("rollout_throughput", "benchmarks.rollout_throughput", "Rollout tokens/s and weight sync s/GB"),
    Benchmark("reward_throughput", "benchmarks.reward_throughput", "Reward items/s"),
    Benchmark("logprob_memory", "benchmarks.logprob_memory", "Log-probs + entropy: chunked vs naive, memory and time"),
    Benchmark("conversion_memory", "benchmarks.conversion_memory", "Checkpoint conversion peak RSS"),
)


def device_name() -> str:
    """``cpu-<N>core``, or ``<gpu name>-x<N>`` on a GPU machine."""
    try:
        import torch

        if torch.cuda.is_available():
            name = torch.cuda.get_device_name(0).lower().replace("nvidia ", "").split()[0]
            return f"{name}-x{torch.cuda.device_count()}"
    except ImportError:
        pass
    return f"cpu-{os.cpu_count()}core"


def machine_info() -> dict:
    info = {"python": platform.python_version(), "cores": os.cpu_count(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
        with open("/proc/meminfo") as f:
            info["mem_gib"] = round(int(f.readline().split()[1]) / 2**20, 1)
    except OSError:
        pass
    try:
        import torch

        info["torch"] = torch.__version__
    except ImportError:
        pass
    return info


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def run_benchmarks(quick: bool, benchmarks=BENCHMARKS, log: Callable[[str], None] = print) -> dict:
    """Run each benchmark; figures, errors, durations and load averages by key."""
    out: dict = {}
    for b in benchmarks:
        log(f"== {b.key}: {b.title}")
        entry: dict = {"title": b.title, "load_before": _load()}
        start = time.perf_counter()
        try:
            entry["figures"] = importlib.import_module(b.module).run(quick=quick)
        except Exception as err:  # one failing benchmark must not lose the others' figures
            entry["error"] = f"{type(err).__name__}: {err}"
            entry["traceback"] = traceback.format_exc()[-4000:]
            log(f"   failed: {entry['error'][:500]}")
        entry["seconds"] = round(time.perf_counter() - start, 1)
        entry["load_after"] = _load()
        out[b.key] = entry
        log(f"   {entry['seconds']:.0f} s, load {entry['load_before']} -> {entry['load_after']}")
    return out


# --------------------------------------------------------------------------- markdown
def goal_row(rows: list, name: str, value, goal: float, higher_is_better: bool, fmt: str = "{:.3f}") -> None:
    """Appends (goal, measured, target, verdict) to ``rows``; ``value`` None reads "not measured"."""
    if value is None:
        rows.append((name, "not measured", f"{'>=' if higher_is_better else '<='} {goal:g}", "n/a"))
        return
    met = value >= goal if higher_is_better else value <= goal
    by = value / goal - 1
    verdict = "met" if met else f"missed by {abs(by):.0%}"
    if met:
        verdict += f" ({by:+.0%})"
    rows.append((name, fmt.format(value), f"{'>=' if higher_is_better else '<='} {goal:g}", verdict))


def _md_train_step(f: dict, goals: list) -> list[str]:
    peak = f["matmul_peak"]
    lines = [f"fp32 matmul peak ({f['threads']} threads, best of 512/1024/2048 squares, measured before and after): "
             f"{peak['before_gflops']:.1f} / {peak['after_gflops']:.1f} GFLOP/s; MFU below is against "
             f"{peak['peak_flops'] / 1e9:.1f}.", "",
             "| model | side | s/step median (best) | CPU s/step | tokens/s | MFU 6N | MFU 6N+attn |", "|---|---|---|---|---|---|---|"]
    for model, r in f["models"].items():
        for kind, label in (("megatron", "ours (Megatron)"), ("plain_hf", "plain HF + PyTorch")):
            x = r[kind]
            lines.append(f"| {model} ({r['parameters'] / 1e6:.1f}M) | {label} | {x['step_s_median']:.3f} ({x['step_s_min']:.3f}) | "
                         f"{x['cpu_s_median']:.3f} | {x['tokens_per_s']:.1f} | {x['mfu_6n']:.1%} | {x['mfu_6n_attn']:.1%} |")
    lines.append("")
    for model, r in f["models"].items():
        lines.append(f"- {model}: ours / plain tokens/s = **{r['ratio_tokens_per_s']:.3f}** (median of paired steps), "
                     f"{r['ratio_tokens_per_s_best']:.3f} best vs best, {r['ratio_cpu_time']:.3f} by CPU time; "
                     f"step-0 loss ours {r['step0_loss_ours']:.6f}, plain {r['step0_loss_plain']:.6f}; "
                     f"{r['tokens_per_step']} tokens/step, {r['steps']} paired steps.")
        goal_row(goals, f"train step vs plain HF, {model} (tokens/s ratio)", r["ratio_tokens_per_s"], 1.0, True)
        for kind, table in r.get("profiles", {}).items():
            lines += ["", f"<details><summary>profile of one {kind} step ({model}, torch.profiler, top ops by self CPU)"
                          "</summary>", "", "```", table.rstrip(), "```", "</details>"]
    return lines


def _md_packing(f: dict, goals: list) -> list[str]:
    lines = [f"{f['model']}: {f['rows']} rows ({f['rows_sft']} SFT), {f['tokens_per_step']} tokens/step, long-tailed "
             f"(median {f['row_tokens_median']:.0f}, longest {f['row_tokens_max']} tokens), micro-batch budget {f['budget']} "
             f"tokens, {f['threads']} threads, {f['steps']} paired steps.", "",
             "| layout | micro-batches | positions run | fill | of the budget | s/step | tokens/s |", "|---|---|---|---|---|---|---|"]
    for layout in ("packed", "padded"):
        x = f[layout]
        lines.append(f"| {layout} | {x['microbatches']} | {x['positions_run']} | {x['fill']:.1%} | {x['budget_fill']:.1%} | "
                     f"{x['step_s_median']:.2f} | {x['tokens_per_s']:.1f} |")
    lines += ["", f"- packed / padded tokens/s = **{f['ratio_tokens_per_s']:.3f}** (median of paired steps), "
                  f"{f['ratio_cpu_time']:.3f} by CPU time; step-0 loss packed {f['step0_loss_packed']:.6f}, "
                  f"padded {f['step0_loss_padded']:.6f}."]
    goal_row(goals, f"packed vs padded training step, long-tailed rows, {f['model']} (tokens/s ratio)",
             f["ratio_tokens_per_s"], f["goal_ratio"], True)
    return lines


def _md_peer(f: dict, goals: list) -> list[str]:
    if "skipped" in f:
        goal_row(goals, "whole HPT step vs TRL GRPOTrainer, smollm2 (tokens/s ratio)", None, 1.5, True)
        return [f"Not run: {f['skipped']}."]
    lines = ["RL step: 2 prompts x 4 samples, <= 64 new tokens; phases in seconds (medians).", "",
             "| model | side | s/step | tokens/step | tokens/s | generation | reward | train | sync |",
             "|---|---|---|---|---|---|---|---|---|"]
    for model, r in f["rl"].items():
        o, t = r["ours"], r["trl_grpo"]
        lines.append(f"| {model} | ours (megatron-hpt train) | {o['step_s']:.2f} | {o['tokens_per_step']:.0f} | "
                     f"{o['tokens_per_s']:.1f} | {o['generation_s']:.2f} | {o['reward_s']:.3f} | {o['train_s']:.2f} | "
                     f"{o['sync_s']:.2f} |")
        lines.append(f"| {model} | TRL GRPOTrainer | {t['step_s']:.2f} | {t['tokens_per_step']:.0f} | {t['tokens_per_s']:.1f} | "
                     f"{t['generation_s']:.2f} | {t['reward_s']:.3f} | {t['train_s']:.2f} | - |")
    lines.append("")
    for model, r in f["rl"].items():
        lines.append(f"- {model}: tokens/s ours / TRL **{r['ratio_tokens_per_s']:.2f}**; step time ours / TRL "
                     f"{r['ratio_step_time_ours_over_theirs']:.2f} (generation {r['ratio_generation_time_ours_over_theirs']:.2f}, "
                     f"training {r['ratio_train_time_ours_over_theirs']:.2f}); {r['measured_steps'][0]} / "
                     f"{r['measured_steps'][1]} measured steps in {r['rounds']} alternating rounds.")
        goal_row(goals, f"whole HPT step vs TRL GRPOTrainer, {model} (tokens/s ratio)", r["ratio_tokens_per_s"], 1.5, True, "{:.2f}")
    lines += ["", "SFT step: 8 rows x (32 prompt + 64 completion tokens).", "",
              "| model | ours s/step | ours tokens/s | TRL SFTTrainer s/step | TRL tokens/s | ours / TRL tokens/s |",
              "|---|---|---|---|---|---|"]
    for model, r in f["sft"].items():
        lines.append(f"| {model} | {r['ours']['step_s']:.3f} | {r['ours']['tokens_per_s']:.1f} | {r['trl_sft']['step_s']:.3f} | "
                     f"{r['trl_sft']['tokens_per_s']:.1f} | **{r['ratio_tokens_per_s']:.2f}** |")
    return lines


def _md_hpt_step(f: dict, goals: list) -> list[str]:
    lines = [f"{f['workload']}; median of {f['num_steps']} steps after a warm-up step: **{f['step_s_median']:.2f} s/step**, "
             f"{f['tokens_per_s_median']:.1f} training tokens/s ({f['rows_sft']:.0f} SFT + {f['rows_rl']:.0f} RL rows, "
             f"mean response {f['response_len_mean']:.1f} tokens).", "", "| phase | seconds | share |", "|---|---|---|"]
    for p, v in f["phase_s_median"].items():
        lines.append(f"| {p} | {v:.3f} | {f['phase_share'][p]:.1%} |")
    return lines


def _md_rollout(f: dict, goals: list) -> list[str]:
    lines = [f"{f['workload']} on the tiny model: own server **{f['own_server_tok_s']:.0f} tok/s**, plain HF generate "
             f"{f['hf_generate_per_prompt_tok_s']:.0f} (per prompt) / {f['hf_generate_one_batch_tok_s']:.0f} (one batch); "
             f"own / best HF {f['ratio_own_vs_best_hf_generate']:.2f}."]
    if f.get("sglang_tok_s"):
        lines.append(f"Real SGLang (CPU): {f['sglang_tok_s']:.0f} tok/s; own / SGLang {f['ratio_own_vs_sglang']:.2f}.")
    else:
        lines.append("Real SGLang (CPU) not measured: .venv-sglang absent (`make sglang-cpu`).")
    lines.append(f"Weight sync ({f['weight_sync_model_gb']:.2f} GB model): through disk **{f['disk_total_s_per_gb']:.2f} s/GB** "
                 f"(write {f['disk_write_s_per_gb']:.2f}, load {f['disk_load_s_per_gb']:.2f}); torch.distributed (gloo) "
                 f"**{f['distributed_s_per_gb']:.2f} s/GB**.")
    return lines


def _md_reward(f: dict, goals: list) -> list[str]:
    return [f"{f['num_items']} items ({f['num_timeouts']} time out at {f['timeout_s']} s): pool of 2 **{f['pool2_items_per_s']} items/s**, "
            f"serial {f['serial_items_per_s']} items/s ({f['pool_vs_serial']}x); pool start {f['pool_startup_s']} s."]


def _md_logprob(f: dict, goals: list) -> list[str]:
    goal_row(goals, "chunked log-probs peak memory / naive", f["memory_ratio"], 0.25, False)
    goal_row(goals, "chunked log-probs CPU time / naive", f["time_ratio"], 1.2, False)
    return [f"{f['tokens']} tokens x vocab {f['vocab']}, {f['logits_dtype']} logits, {f['threads']} thread(s), forward + backward:",
            f"naive peak {f['naive_peak_mib']:.0f} MiB, CPU {f['naive_cpu_time_s']:.2f} s; chunked peak {f['chunked_peak_mib']:.0f} MiB, "
            f"CPU {f['chunked_cpu_time_s']:.2f} s: memory ratio **{f['memory_ratio']:.3f}**, time ratio **{f['time_ratio']:.3f}** "
            f"(wall {f['wall_time_ratio']:.3f})."]


def _md_conversion(f: dict, goals: list) -> list[str]:
    m = f["model"]
    lines = [f"Synthetic Qwen2, {m['parameters'] / 1e9:.2f}B parameters, bf16, {f['checkpoint_bytes'] / 2**30:.2f} GiB; "
             f"python + torch + megatron-core + transformers alone: {f['import_rss'] / 2**30:.2f} GiB RSS.", "",
             "| conversion | seconds | peak RSS | / size | tree PSS | / size |", "|---|---|---|---|---|---|"]
    for name in ("hf_to_megatron", "megatron_to_hf", "reshard"):
        x = f[name]
        lines.append(f"| {name} | {x['seconds']:.1f} | {x['peak_rss'] / 2**30:.2f} GiB | {x['peak_rss_over_size']:.2f} | "
                     f"{x['peak_tree_pss'] / 2**30:.2f} GiB | {x['peak_tree_pss_over_size']:.2f} |")
    goal_row(goals, "hf_to_megatron peak RSS / checkpoint size", f["hf_to_megatron"]["peak_rss_over_size"], 1.5, False, "{:.2f}")
    return lines


FORMATTERS = {
    "train_step": _md_train_step,
    "packing": _md_packing,
    "peer_trl": _md_peer,
    "hpt_step": _md_hpt_step,
    "rollout_throughput": _md_rollout,
    "reward_throughput": _md_reward,
    "logprob_memory": _md_logprob,
    "conversion_memory": _md_conversion,
}

GPU_NOT_RUN = ("not run: no GPU on this machine. `benchmarks/gpu/run_on_device.sh` is the prepared one-go script "
               "for the lent GPU machine (see benchmarks/gpu/README.md).")


def render_markdown(results: dict) -> str:
    goals: list = []
    body: list[str] = []
    for key, entry in results["benchmarks"].items():
        body += ["", f"## {entry['title']}", "",
                 f"`{key}`: {entry['seconds']:.0f} s, load average {entry['load_before']} -> {entry['load_after']}.", ""]
        if "error" in entry:
            body += [f"**Failed**: `{entry['error'][:800]}`"]
            continue
        fmt = FORMATTERS.get(key)
        try:
            body += fmt(entry["figures"], goals) if fmt else []
        except (KeyError, TypeError) as err:  # a figure missing: show the raw figures rather than nothing
            body += [f"(summary unavailable: {type(err).__name__}: {err})"]
        if not fmt:
            body += ["```json", json.dumps(entry["figures"], indent=1)[:6000], "```"]
    m = results["machine"]
    head = [f"# Benchmarks {results['date']} on {results['device']}{' (quick)' if results['quick'] else ''}", "",
            f"`python benchmarks/run_all.py{' --quick' if results['quick'] else ''}`, {results['total_seconds'] / 60:.1f} min; "
            f"{m.get('cpu', '?')}, {m.get('cores')} cores, {m.get('mem_gib')} GiB, torch {m.get('torch')}, Python {m.get('python')}, "
            f"OMP_WAIT_POLICY={m.get('omp_wait_policy')}. Load average at start {results['load_start']}, at end "
            f"{results['load_end']} (the cores are shared with other work: ratios measured side by side are the figures "
            "to read; absolute times move with the load).", "",
            f"GPU suite: {results['gpu_suite']}", "", "## Goals", "", "| goal | measured | target | verdict |", "|---|---|---|---|"]
    head += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in goals]
    return "\n".join(head + body) + "\n"


def write_results(results: dict, out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{results['date']}-{results['device']}{'-quick' if results['quick'] else ''}"
    json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    json_path.write_text(json.dumps(results, indent=1, default=str) + "\n")
    md_path.write_text(render_markdown(results))
    return md_path, json_path


def run_all(quick: bool = False, only: list[str] | None = None, out_dir: Path = RESULTS, benchmarks=BENCHMARKS,
            gpu_suite: str = GPU_NOT_RUN, log: Callable[[str], None] = print) -> tuple[Path, Path]:
    chosen = [b for b in benchmarks if not only or b.key in only]
    unknown = set(only or []) - {b.key for b in benchmarks}
    if unknown:
        raise SystemExit(f"unknown benchmark(s) {sorted(unknown)}; known: {', '.join(b.key for b in benchmarks)}")
    start = time.perf_counter()
    load_start = _load()
    results = {
        "date": dt.date.today().isoformat(),
        "device": device_name(),
        "quick": quick,
        "machine": machine_info(),
        "gpu_suite": gpu_suite,
        "load_start": load_start,
    }
    results["benchmarks"] = run_benchmarks(quick, chosen, log)
    results["load_end"] = _load()
    results["total_seconds"] = time.perf_counter() - start
    return write_results(results, out_dir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes (minutes)")
    parser.add_argument("--only", help="comma-separated benchmark keys: " + ", ".join(b.key for b in BENCHMARKS))
    parser.add_argument("--out-dir", default=str(RESULTS))
    args = parser.parse_args()
    md, js = run_all(args.quick, args.only.split(",") if args.only else None, Path(args.out_dir))
    print(f"wrote {md} and {js}")


if __name__ == "__main__":
    main()
