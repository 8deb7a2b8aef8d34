"""Sequence packing vs padding: our training step on long-tailed rows, tokens/s of both
micro-batch layouts side by side.

    python benchmarks/packing.py [--quick] [--model smollm2] [--rows 24] [--steps 3]

The rows are an HPT mini-batch with the paper's long-tailed lengths
(``gpu_validation.paper_like_draws``: prompts <= 1024, log-normal responses <= 8192,
every fourth row an SFT demonstration) scaled so the longest possible row is
``--max-row`` tokens, under a micro-batch budget of ``--budget`` tokens (the paper's
32768 for 9216-token rows, scaled alike). Both sides are ``MegatronPolicy.train_minibatch``
with the HPT preset on the same weights, fp32, 2 threads; one packs each micro-batch's
rows into one sequence (``train.step.packing: packed``), the other pads them
(``padded``). Each lives in its own worker process and the parent alternates single
steps between them (``train_step.paired_steps``), so the machine's other load hits both
alike; the step-0 losses must agree. Reported: micro-batches and positions run (padding
included) by each layout, fill, and the tokens/s ratio packed / padded (median of the
paired steps).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.train_step import CONSTANT_NORMALIZER, THREADS, _MegatronSide, _Worker, paired_steps, serve  # noqa: E402

MAX_ROW = 576
"""Longest possible row: the paper's 1024 + 8192 tokens scaled by 1/16 (CPU-sized)."""
BUDGET = 2048
"""Micro-batch budget: the paper's 32768 scaled by 1/16."""


def longtail_rows(vocab: int, count: int, max_row: int, seed: int = 0) -> list:
    """``count`` mixed SFT/RL rows with ``paper_like_draws`` lengths scaled so the longest
    possible row (1024 + 8192 tokens) has ``max_row`` tokens."""
    from benchmarks.gpu.gpu_validation import _row, paper_like_draws

    rng = random.Random(seed + 1)
    scale = max_row / (1024 + 8192)
    return [_row(rng, vocab, max(2, round(p * scale)), max(2, round(r * scale)), i)
            for i, (p, r) in enumerate(paper_like_draws(count, seed))]


def layouts(hf_config, rows, budget: int) -> dict:
    """Micro-batches and positions run (padding included) of each layout, as our policy
    batches the rows on one CPU rank."""
    from megatron_hpt.training.batching import CostModel, dynamic_batches
    from megatron_hpt.training.policy import attention_tokens, row_lengths

    lengths = row_lengths(rows)
    out = {}
    for layout in ("packed", "padded"):
        cm = CostModel(layout=layout, attention_tokens=attention_tokens(hf_config))
        bins = dynamic_batches(lengths, budget, cm)
        run = sum(cm.microbatch_tokens([lengths[i] for i in b]) for b in bins)
        out[layout] = {"microbatches": len(bins), "positions_run": run, "fill": sum(lengths) / run,
                       "budget_fill": sum(lengths) / (budget * len(bins))}
    return out


def compare(model: str, num_rows: int, max_row: int, budget: int, steps: int) -> dict:
    from transformers import AutoConfig

    from benchmarks.bench_models import model_dir

    hf = AutoConfig.from_pretrained(model_dir(model))
    rows = longtail_rows(hf.vocab_size, num_rows, max_row)
    tokens = sum(r.num_tokens for r in rows)
    args = ["--model", model, "--rows", str(num_rows), "--max-row", str(max_row), "--budget", str(budget)]
    packed = _Worker("packed", argv=[__file__, "--worker", "packed", *args])
    try:
        padded = _Worker("padded", argv=[__file__, "--worker", "padded", *args])
        try:
            (first_packed, first_padded), times, cpu = paired_steps(packed, padded, steps)
        finally:
            padded.close()
    finally:
        packed.close()
    gap = abs(first_packed["loss"] - first_padded["loss"])
    if gap > 1e-4 * max(1.0, abs(first_padded["loss"])):
        raise AssertionError(f"{model}: step-0 losses differ: packed {first_packed['loss']}, padded {first_padded['loss']}")
    out = {"model": model, "rows": num_rows, "rows_sft": sum(r.kind == "sft" for r in rows), "tokens_per_step": tokens,
           "row_tokens_max": max(r.num_tokens for r in rows), "row_tokens_median": statistics.median(r.num_tokens for r in rows),
           "max_row": max_row, "budget": budget, "steps": steps, "threads": THREADS,
           "step0_loss_packed": first_packed["loss"], "step0_loss_padded": first_padded["loss"]}
    for layout, figures in layouts(hf, rows, budget).items():
        ts = times[layout]
        out[layout] = {**figures, "step_s_median": statistics.median(ts), "step_s_all": ts,
                       "cpu_s_median": statistics.median(cpu[layout]), "tokens_per_s": tokens / statistics.median(ts)}
    # steps i of both sides ran back to back: the median of their ratios is the side-by-side figure
    out["ratio_tokens_per_s"] = statistics.median(d / p for p, d in zip(times["packed"], times["padded"]))
    out["ratio_cpu_time"] = out["padded"]["cpu_s_median"] / out["packed"]["cpu_s_median"]
    out["goal_ratio"] = 1.0
    out["goal_met"] = out["ratio_tokens_per_s"] >= out["goal_ratio"]
    return out


def run(quick: bool = False, model: str | None = None, num_rows: int | None = None, steps: int | None = None,
        max_row: int = MAX_ROW, budget: int = BUDGET) -> dict:
    """SmolLM2-135M, 24 rows, 3 paired steps; ``quick``: the tiny model, 32 rows, 3 steps."""
    model = model or ("tiny" if quick else "smollm2")
    num_rows = num_rows or (32 if quick else 24)
    return compare(model, num_rows, max_row, budget, steps or 3)


def _worker(layout: str, model: str, num_rows: int, max_row: int, budget: int) -> None:
    import torch
    from transformers import AutoConfig

    from benchmarks.bench_models import model_dir

    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    path = str(model_dir(model))
    rows = longtail_rows(AutoConfig.from_pretrained(path).vocab_size, num_rows, max_row)
    serve(_MegatronSide(path, rows, packing=layout, max_tokens=budget))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the tiny model")
    parser.add_argument("--model", choices=["tiny", "smollm2"])
    parser.add_argument("--rows", type=int, help="rows per step (24; 32 with --quick)")
    parser.add_argument("--steps", type=int, help="paired steps after a warm-up step each (3)")
    parser.add_argument("--max-row", type=int, default=MAX_ROW, help="longest possible row, tokens")
    parser.add_argument("--budget", type=int, default=BUDGET, help="micro-batch budget, tokens")
    parser.add_argument("--worker", choices=["packed", "padded"])
    args = parser.parse_args()
    if args.worker:
        _worker(args.worker, args.model, args.rows, args.max_row, args.budget)
        return
    r = run(args.quick, args.model, args.rows, args.steps, args.max_row, args.budget)
    print(f"{r['model']}: {r['rows']} rows ({r['rows_sft']} SFT), {r['tokens_per_step']} tokens/step, rows of "
          f"median {r['row_tokens_median']} and at most {r['row_tokens_max']} tokens; budget {r['budget']}")
    for layout in ("packed", "padded"):
        x = r[layout]
        print(f"  {layout}: {x['microbatches']} micro-batches, {x['positions_run']} positions run (fill {x['fill']:.1%}, "
              f"{x['budget_fill']:.1%} of the budget), {x['step_s_median']:.2f} s/step, {x['tokens_per_s']:.1f} tok/s")
    print(f"  packed / padded tokens/s: {r['ratio_tokens_per_s']:.3f} (median of {r['steps']} paired steps; "
          f"by CPU time {r['ratio_cpu_time']:.3f}); step-0 loss packed {r['step0_loss_packed']:.6f}, "
          f"padded {r['step0_loss_padded']:.6f}")


if __name__ == "__main__":
    main()
