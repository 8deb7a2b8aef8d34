"""The comparison's figures: learning curves (one line per algorithm, the mean over
seeds, a band of ± one std) and pass@k curves of the final models (k on a log2 axis)."""

from __future__ import annotations

from pathlib import Path

from megatron_hpt.trainer.compare.plan import display_name
from megatron_hpt.trainer.compare.results import CURVES


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_learning_curves(curves: dict, out_png: Path, title: str) -> Path:
    """``curves``: results.mean_curves output."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(CURVES), figsize=(4.4 * len(CURVES), 3.6))
    for ax, (key, panel) in zip(axes, CURVES.items()):
        for algorithm, per_metric in curves.items():
            data = per_metric.get(key)
            if not data or not data["step"]:
                continue
            steps, mean = data["step"], data["mean"]
            (line,) = ax.plot(steps, mean, marker="o" if len(steps) <= 15 else None, markersize=3,
                              label=display_name(algorithm))
            if any(s is not None for s in data["std"]):
                lo = [m - (s or 0.0) for m, s in zip(mean, data["std"])]
                hi = [m + (s or 0.0) for m, s in zip(mean, data["std"])]
                ax.fill_between(steps, lo, hi, color=line.get_color(), alpha=0.15, linewidth=0)
        ax.set_title(panel, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 8), fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def plot_pass_at_k(pass_at_k: dict, out_png: Path, title: str) -> Path:
    """``pass_at_k``: results.mean_pass_at_k output; one panel per benchmark."""
    plt = _pyplot()
    benches = sorted({b for per in pass_at_k.values() for b in per})
    fig, axes = plt.subplots(1, max(len(benches), 1), figsize=(4.8 * max(len(benches), 1), 3.8), squeeze=False)
    for ax, bench in zip(axes[0], benches):
        for algorithm, per in pass_at_k.items():
            data = per.get(bench)
            if not data:
                continue
            (line,) = ax.plot(data["k"], data["mean"], marker="o", markersize=3, label=display_name(algorithm))
            if any(s is not None for s in data["std"]):
                lo = [m - (s or 0.0) for m, s in zip(data["mean"], data["std"])]
                hi = [m + (s or 0.0) for m, s in zip(data["mean"], data["std"])]
                ax.fill_between(data["k"], lo, hi, color=line.get_color(), alpha=0.15, linewidth=0)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("k")
        ax.set_ylabel("pass@k (%)")
        ax.set_title(bench, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png
