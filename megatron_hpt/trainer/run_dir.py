"""A run's output directory: which run owns it, and whether a new run may start there.

``output_dir/run.json`` holds the id of the run that owns the directory; every
checkpoint records the id of the run that wrote it, so resuming and pruning only
ever touch the run's own checkpoints (``training.checkpoint``).

How a training command may use the directory (``prepare_run_dir``):

- ``fresh`` (``megatron-hpt train``): the directory must be missing or empty. One
  holding anything (a previous run's checkpoints, metrics, config) is refused, so a
  new run can never prune, truncate or mix with an earlier one.
- ``resume`` (``--resume``): continue the run the directory holds from its newest
  checkpoint; start a new run there when it holds no checkpoint yet (so a requeued
  job is the same command as the first submission).
- ``overwrite`` (``--overwrite``): move the directory's contents aside, as a whole,
  to ``<output_dir>.replaced-<UTC time>`` (a rename: instant, and nothing is lost
  until you delete it), then start fresh.

Overwriting is a command-line choice, not a config field, on purpose: a field would
live on in recipes and in the run's own ``config.yaml``, and a requeued or
resubmitted job would then wipe the very run it was meant to continue.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import uuid
from pathlib import Path
from typing import Literal

from megatron_hpt.config import InputError
from megatron_hpt.models.checkpoint import durable_write_text, fsync_path

RUN_FILE = "run.json"
StartMode = Literal["fresh", "resume", "overwrite"]


class RunDirError(InputError):
    """The output directory cannot be used the way the command asks (exit code 2)."""


def read_run_id(output_dir: str | Path) -> str | None:
    """The id of the run that owns ``output_dir``; None when it has no ``run.json``
    (a directory written before runs had ids, or none at all)."""
    path = Path(output_dir) / RUN_FILE
    if not path.is_file():
        return None
    try:
        return str(json.loads(path.read_text())["run_id"])
    except (ValueError, KeyError, TypeError) as e:
        raise RunDirError(f"{path}: not a valid run file ({e}); restore it, or move the directory away") from None


def _entries(path: Path) -> list[str]:
    return sorted(os.listdir(path)) if path.is_dir() else []


def _start_run(output_dir: Path) -> str:
    run_id = uuid.uuid4().hex
    if not output_dir.is_dir():
        output_dir.mkdir(parents=True)
        fsync_path(output_dir.parent)
    created = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    durable_write_text(output_dir / RUN_FILE, json.dumps({"run_id": run_id, "created": created}, indent=2) + "\n")
    return run_id


def move_aside(output_dir: Path) -> Path:
    """Rename ``output_dir`` to ``<output_dir>.replaced-<UTC time>`` and return the new path."""
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    target = output_dir.with_name(f"{output_dir.name}.replaced-{stamp}")
    suffix = 1
    while target.exists():
        suffix += 1
        target = output_dir.with_name(f"{output_dir.name}.replaced-{stamp}-{suffix}")
    try:
        os.rename(output_dir, target)
    except OSError as e:
        raise RunDirError(
            f"--overwrite: cannot move the previous run in {output_dir} aside to {target}: {e}. "
            "Move or delete it yourself, or choose another output_dir"
        ) from None
    fsync_path(target.parent)
    return target


def prepare_run_dir(output_dir: str | Path, mode: StartMode, log=print) -> str | None:
    """Make ``output_dir`` ready for a run started in ``mode``; returns the run's id
    (None for a directory written before runs had ids, resumed as it is).

    Call it once per run, before any rank writes anything (rank 0, or the process
    that starts the ranks)."""
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise RunDirError(f"output_dir={str(out)!r} is a file, not a directory; choose another output_dir")
    entries = _entries(out)
    if mode == "resume":
        run_id = read_run_id(out)
        if run_id is not None:
            return run_id
        if (out / "checkpoints").is_dir() and any(name.startswith("step_") for name in _entries(out / "checkpoints")):
            return None  # written before runs had ids: its checkpoints are all this run's
        return _start_run(out)
    if mode == "overwrite" and entries:
        moved = move_aside(out)
        log(f"--overwrite: moved the previous contents of {out} to {moved} (delete it when you no longer need it)")
        return _start_run(out)
    if entries:
        shown = ", ".join(entries[:6]) + (f", ... ({len(entries)} entries)" if len(entries) > 6 else "")
        raise RunDirError(
            f"output_dir={str(out)!r} already holds files ({shown}), probably an earlier run. "
            "A new run there would prune its checkpoints and truncate its metrics. "
            "Add --resume to continue that run, --overwrite to move it aside and start over, "
            "or set output_dir=<another directory>"
        )
    return _start_run(out)
