"""Per-step metrics: JSONL (the source of truth, one line per step), TensorBoard and
optionally Weights & Biases, plus the one-line step summary on the console.

A run killed while appending leaves a partial last line in ``metrics.jsonl``; readers
skip it and a resumed run drops it (with the steps after its checkpoint) before it
appends again. A bad line anywhere else is an error naming the file and the line.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from megatron_hpt.config import InputError
from megatron_hpt.models.checkpoint import durable_write_text


class MetricsFileError(InputError):
    """A metrics.jsonl line other than the last is not a JSON record with a step."""


def _records(path: Path) -> list[tuple[str, dict]]:
    """(line, record) of every complete line; a partial last line (the run died while
    writing it) is left out. Any other line that does not parse is an error."""
    lines = path.read_text().split("\n")
    # A complete file ends with a newline, so its last piece is empty; a torn one does not.
    torn, lines = lines[-1], lines[:-1]
    out = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            step = record["step"]
        except (ValueError, TypeError, KeyError) as e:
            raise MetricsFileError(
                f"{path}: line {number} is not a metrics record ({e}): {line[:80]!r}; "
                "fix or delete that line to resume"
            ) from None
        if not isinstance(step, int):
            raise MetricsFileError(f"{path}: line {number}: step must be an integer, got {step!r}")
        out.append((line, record))
    if torn.strip():
        try:  # a last record that is whole but lost only its newline is kept
            record = json.loads(torn)
            if isinstance(record, dict) and isinstance(record.get("step"), int):
                out.append((torn, record))
        except ValueError:
            pass
    return out


class MetricsLogger:
    """Appends ``{"step": N, ...}`` lines to ``metrics.jsonl`` and mirrors them to TensorBoard."""

    def __init__(self, run_dir: Path, tensorboard: bool = True, wandb_project: str | None = None, run_name: str = "") -> None:
        self.path = run_dir / "metrics.jsonl"
        self._tb = None
        self._wandb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(run_dir / "tensorboard"))
        if wandb_project:
            try:
                import wandb
            except ImportError:
                raise RuntimeError("logging.wandb_project is set but wandb is not installed: pip install wandb") from None
            self._wandb = wandb.init(project=wandb_project, name=run_name, dir=str(run_dir))

    def truncate_after(self, step: int) -> None:
        """Drop lines logged after ``step`` (a resumed run repeats those steps)."""
        if not self.path.is_file():
            return
        kept = [line for line, record in _records(self.path) if record["step"] <= step]
        durable_write_text(self.path, "".join(line + "\n" for line in kept))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        clean = {k: (float(v) if isinstance(v, (int, float)) else v) for k, v in sorted(metrics.items())}
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **{k: _json_number(v) for k, v in clean.items()}}) + "\n")
        if self._tb is not None:
            for k, v in clean.items():
                if isinstance(v, float) and math.isfinite(v):
                    self._tb.add_scalar(k, v, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(clean, step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def _json_number(v):
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf; keep them visible
    return v


def read_metrics(path: str | Path) -> list[dict]:
    """The per-step records of a run's metrics.jsonl (a partial last line left out)."""
    return [record for _, record in _records(Path(path))]


def step_summary(step: int, total: int, m: dict[str, float]) -> str:
    """One console line per step."""
    def g(key, fmt="{:.3f}"):
        v = m.get(key)
        return fmt.format(v) if isinstance(v, (int, float)) else "-"

    parts = [
        f"step {step}/{total}",
        f"reward {g('rollout/reward_mean')}",
        f"sft {g('hpt/sft_prompt_frac', '{:.2f}')}",
        f"loss {g('loss/total', '{:.4f}')}",
        f"gnorm {g('train/grad_norm', '{:.2f}')}",
        f"ent {g('actor/entropy')}",
        f"{g('perf/tokens_per_s', '{:.0f}')} tok/s",
        f"{g('timing/step', '{:.1f}')}s",
    ]
    if "eval/accuracy" in m:
        parts.append(f"eval {g('eval/accuracy')}")
    return " | ".join(parts)
