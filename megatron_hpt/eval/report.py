"""The results table in the paper's layout, as markdown and JSON.

Rows are models (runs); columns are AIME24, AIME25, AMC, MATH-500, Minerva,
Olympiad (those present), then Avg (their mean, shown when every shown one of the
six is present for that row), then ARC-c and GPQA, then any other benchmark in
the order first seen. Cells are avg@k in percent with one decimal; a benchmark a
run did not evaluate shows "-".
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from megatron_hpt.data.benchmarks import BENCHMARKS, PAPER_AVERAGE
from megatron_hpt.eval.runner import EvalRun

AVG = "avg"
_OOD = tuple(name for name, spec in BENCHMARKS.items() if not spec.in_paper_average)


def _display(key: str) -> str:
    if key == AVG:
        return "Avg"
    return BENCHMARKS[key].display if key in BENCHMARKS else key


@dataclass
class EvalReport:
    runs: list[EvalRun]

    @property
    def columns(self) -> list[str]:
        """Column keys in table order (benchmark names and "avg")."""
        present: list[str] = []
        for run in self.runs:
            present.extend(name for name in run.results if name not in present)
        paper = [name for name in PAPER_AVERAGE if name in present]
        ood = [name for name in _OOD if name in present]
        others = [name for name in present if name not in paper and name not in ood]
        return paper + ([AVG] if paper else []) + ood + others

    def value(self, run: EvalRun, key: str) -> float | None:
        """The cell in percent, or None when the run lacks it."""
        if key == AVG:
            paper = [name for name in self.columns if name in PAPER_AVERAGE]
            if not paper or any(name not in run.results for name in paper):
                return None
            return 100.0 * sum(run.results[name].avg_at_k for name in paper) / len(paper)
        result = run.results.get(key)
        return None if result is None else 100.0 * result.avg_at_k

    def to_markdown(self, digits: int = 1) -> str:
        columns = self.columns
        lines = [
            "| Model | " + " | ".join(_display(c) for c in columns) + " |",
            "|---|" + "---|" * len(columns),
        ]
        for run in self.runs:
            cells = []
            for key in columns:
                value = self.value(run, key)
                cells.append("-" if value is None else f"{value:.{digits}f}")
            lines.append(f"| {run.model} | " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"

    def to_dict(self) -> dict:
        columns = self.columns
        return {
            "columns": columns,
            "titles": [_display(c) for c in columns],
            "rows": [
                {"model": run.model, "scores": {key: self.value(run, key) for key in columns}} for run in self.runs
            ],
            "details": {run.model: run.to_dict()["results"] for run in self.runs},
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def write(self, out_dir: str | Path, stem: str = "eval_report") -> tuple[Path, Path]:
        """Write ``<stem>.md`` and ``<stem>.json``; returns their paths."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        md, js = out / f"{stem}.md", out / f"{stem}.json"
        md.write_text(self.to_markdown())
        js.write_text(self.to_json() + "\n")
        return md, js


def build_report(runs: Sequence[EvalRun]) -> EvalReport:
    models = [run.model for run in runs]
    duplicates = sorted({m for m in models if models.count(m) > 1})
    if duplicates:
        raise ValueError(f"report rows must have distinct model names; repeated: {', '.join(duplicates)}")
    return EvalReport(list(runs))
