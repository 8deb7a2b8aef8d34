"""The end-of-run report: PNG plots of the curves and a short markdown summary."""

from __future__ import annotations

from pathlib import Path

from megatron_hpt.trainer.metrics_log import read_metrics

PANELS = [
    ("Accuracy", [("rollout/accuracy", "rollout (train prompts)"), ("eval/accuracy", "held-out eval")]),
    ("HPT switch", [("hpt/sft_prompt_frac", "SFT fraction of prompts")]),
    ("Loss", [("loss/sft", "SFT"), ("loss/pg", "policy gradient"), ("loss/total", "total")]),
    ("Entropy", [("actor/entropy", "token entropy")]),
    ("Grad norm", [("train/grad_norm", "grad norm")]),
    ("Train vs rollout log-probs", [("rollout/logp_gap_abs", "mean |dlogp| (incl. the step's own updates)")]),
    ("Throughput", [("perf/tokens_per_s", "tokens/s (whole step)")]),
    ("Time per step (s)", [("timing/rollout", "rollout"), ("timing/reward", "reward"), ("timing/logprobs", "log-probs"),
                           ("timing/train", "train"), ("timing/sync", "weight sync")]),
]


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for r in records:
        v = r.get(key)
        if isinstance(v, (int, float)):
            xs.append(r["step"])
            ys.append(float(v))
    return xs, ys


def plot_curves(records: list[dict], out_png: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 4
    rows = (len(PANELS) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows))
    for ax, (panel, keys) in zip(axes.flat, PANELS):
        for key, label in keys:
            xs, ys = _series(records, key)
            if xs:
                ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, label=label)
        ax.set_title(panel)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(PANELS):]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def write_report(run_dir: str | Path, title: str, extra_sections: list[str] | None = None) -> Path:
    """Write run_dir/curves.png and run_dir/report.md from run_dir/metrics.jsonl."""
    run_dir = Path(run_dir)
    records = read_metrics(run_dir / "metrics.jsonl")
    png = plot_curves(records, run_dir / "curves.png", title)
    evals = [r for r in records if "eval/accuracy" in r]
    lines = [f"# {title}", "", f"![curves]({png.name})", ""]
    if evals:
        first, last = evals[0], evals[-1]
        best = max(evals, key=lambda r: r["eval/accuracy"])
        lines += [
            "| | step | held-out accuracy |",
            "|---|---|---|",
            f"| first eval | {first['step']} | {first['eval/accuracy']:.3f} |",
            f"| last eval | {last['step']} | {last['eval/accuracy']:.3f} |",
            f"| best eval | {best['step']} | {best['eval/accuracy']:.3f} |",
            "",
        ]
    train = [r for r in records if "hpt/sft_prompt_frac" in r]
    if train:
        head, tail = train[: max(1, len(train) // 10)], train[-max(1, len(train) // 10):]

        def mean(rs, k):
            vals = [r[k] for r in rs if isinstance(r.get(k), (int, float))]
            return sum(vals) / len(vals) if vals else float("nan")

        lines += [
            "| | first 10% of steps | last 10% of steps |",
            "|---|---|---|",
            f"| SFT fraction of prompts | {mean(head, 'hpt/sft_prompt_frac'):.2f} | {mean(tail, 'hpt/sft_prompt_frac'):.2f} |",
            f"| rollout accuracy | {mean(head, 'rollout/accuracy'):.3f} | {mean(tail, 'rollout/accuracy'):.3f} |",
            f"| tokens/s | {mean(head, 'perf/tokens_per_s'):.0f} | {mean(tail, 'perf/tokens_per_s'):.0f} |",
            f"| seconds per step | {mean(head, 'timing/step'):.2f} | {mean(tail, 'timing/step'):.2f} |",
            "",
        ]
    lines += extra_sections or []
    out = run_dir / "report.md"
    out.write_text("\n".join(lines) + "\n")
    return out
