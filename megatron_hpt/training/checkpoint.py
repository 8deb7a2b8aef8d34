"""Training checkpoints: model and optimizer in megatron's ``dist_checkpointing``
format, plus the LR schedule, counters, the caller's state (data sampler, trainer
progress) and every rank's RNG states; written atomically and durably, the last k kept.

Layout of a checkpoint root::

    root/step_000012/weights/         model + optimizer (``megatron_hpt.models.checkpoint``)
    root/step_000012/trainer_state.pt LR schedule, counters, the run's id, the trainer's own state
    root/step_000012/rng/rank_*.pt    every rank's RNG states
    root/latest                       the name of the newest complete checkpoint

``weights/`` is a model checkpoint like the ones conversion writes, so
``megatron-hpt convert megatron-to-hf`` exports any training checkpoint.

A checkpoint is written into ``step_X.tmp``, fsynced, and renamed once every rank
is done; ``latest`` is then replaced atomically (fsynced file, renamed, directory
fsynced), so a run killed or a machine that loses power in the middle of a save
leaves the previous checkpoint loadable. Checkpoints are ordered by the step number
in their name (``step_1000000`` is newer than ``step_999999``). Each records the id
of the run that wrote it: resuming and pruning only ever see the run's own
checkpoints, and pruning never deletes the checkpoint just written.

The side files (``trainer_state.pt``, ``rng/``) hold only tensors and plain Python
values and are read with ``torch.load(weights_only=True)``: loading a checkpoint
never runs code from it.
"""

from __future__ import annotations

import pickle
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from megatron_hpt.config import InputError
from megatron_hpt.models.checkpoint import (
    commit_temp_dir,
    durable_write_text,
    fsync_path,
    naming_write_errors,
)
from megatron_hpt.parallel import ParallelState, collective_device

_STEP_DIR = re.compile(r"^step_(\d+)$")
TRAINER_STATE = "trainer_state.pt"
LATEST = "latest"


class CheckpointError(InputError):
    """A training checkpoint that cannot be used: incomplete, or holding more than plain data."""


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def checkpoint_name(step: int) -> str:
    """``step_000012``: six digits at least, more past step 999,999."""
    return f"step_{step:06d}"


def checkpoint_step(path: str | Path) -> int | None:
    """The step of a checkpoint directory's name, or None for any other name."""
    match = _STEP_DIR.match(Path(path).name)
    return int(match.group(1)) if match else None


def rng_state() -> dict[str, Any]:
    """Python, numpy, torch (CPU and CUDA) and megatron's tracker states of this rank,
    as tensors and plain values only (so ``weights_only`` loading reads them)."""
    from megatron.core import tensor_parallel

    np_state = np.random.get_state(legacy=False)
    state = {
        "python": random.getstate(),
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    np_state = state["numpy"]
    if isinstance(np_state, tuple):  # written before 0.2: numpy's legacy state tuple
        np.random.set_state(np_state)
    else:
        np.random.set_state({
            "bit_generator": np_state["bit_generator"],
            "state": {"key": np_state["key"].numpy().astype(np.uint32), "pos": np_state["pos"]},
            "has_gauss": np_state["has_gauss"],
            "gauss": np_state["gauss"],
        })
    torch.set_rng_state(state["torch"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _save_durably(obj: Any, path: Path) -> None:
    torch.save(obj, path)
    fsync_path(path)


_NUMPY_ARRAY_GLOBALS = [np._core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]
"""What a plain numpy array needs to unpickle (no code runs): RNG files written before the
side files held only tensors store numpy's state tuple with its uint32 key array."""


def load_side_file(path: str | Path) -> Any:
    """A checkpoint side file (trainer state, RNG states), read without unpickling code."""
    try:
        with torch.serialization.safe_globals(_NUMPY_ARRAY_GLOBALS):
            return torch.load(path, weights_only=True)
    except pickle.UnpicklingError as e:
        reason = re.search(r"WeightsUnpickler error: (.*?)(?:\. Please|\n|$)", str(e))
        raise CheckpointError(
            f"{path}: refused to load: it holds objects other than tensors and plain values "
            f"({reason.group(1) if reason else type(e).__name__}). Checkpoint side files are read "
            "without running code from them; a file written by another program cannot be resumed from."
        ) from None


def optimizer_has_state(optimizer) -> bool:
    """Whether the (chained) megatron optimizer has taken a step yet (on any rank)."""
    subs = getattr(optimizer, "chained_optimizers", [optimizer])
    flag = torch.tensor([int(any(len(sub.optimizer.state) > 0 for sub in subs if sub.optimizer is not None))],
                        device=collective_device())
    if dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def checkpoint_run_id(path: str | Path) -> str | None:
    """The id of the run that wrote a checkpoint (None: written before runs had ids)."""
    state_file = Path(path) / TRAINER_STATE
    if not state_file.is_file():
        return None
    return load_side_file(state_file).get("run_id")


def list_checkpoints(root: str | Path, run_id: str | None = None) -> list[Path]:
    """The checkpoints under ``root``, oldest to newest by step number; with ``run_id``,
    only those that run wrote. (A ``step_N`` directory exists only once complete: it is
    renamed from ``step_N.tmp`` after every rank has written its part.)"""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(checkpoint_step(p), p) for p in root.iterdir() if checkpoint_step(p) is not None and p.is_dir()]
    found.sort()
    return [p for _, p in found if run_id is None or checkpoint_run_id(p) == run_id]


def latest_checkpoint(root: str | Path, run_id: str | None = None) -> Path | None:
    """The newest complete checkpoint under ``root`` (of run ``run_id`` when given), or None:
    the one ``latest`` names if it exists (and is that run's), else the highest step number."""
    root = Path(root)
    pointer = root / LATEST
    if pointer.is_file():
        candidate = root / pointer.read_text().strip()
        if (checkpoint_step(candidate) is not None and candidate.is_dir()
                and (run_id is None or checkpoint_run_id(candidate) == run_id)):
            return candidate
    found = list_checkpoints(root, run_id)
    return found[-1] if found else None


def save_checkpoint(
    root: str | Path, step: int, policy, st: ParallelState, extra: dict[str, Any], keep_last: int = 3,
    hf_dir: str | Path | None = None, run_id: str | None = None,
) -> Path:
    """Save ``policy`` (model, optimizer, schedule, counters), ``extra`` (rank 0's trainer
    state: tensors and plain Python values only) and every rank's RNG at ``root/step_<step>``;
    ``hf_dir`` (config and tokenizer) is recorded so the checkpoint converts back to HF, and
    ``run_id`` so that resuming and pruning keep to this run's checkpoints."""
    from megatron_hpt.models.checkpoint import save_model_checkpoint

    root = Path(root)
    final = root / checkpoint_name(step)
    tmp = root / f"{final.name}.tmp"
    if st.rank == 0:
        if not root.is_dir():
            root.mkdir(parents=True)
            fsync_path(root.parent)
        if tmp.exists():
            shutil.rmtree(tmp)
        (tmp / "rng").mkdir(parents=True)
    _barrier()
    # Before its first update an optimizer has no state to save (and megatron cannot load
    # an empty one back into an initialized optimizer); a fresh optimizer is exact then.
    with_optimizer = optimizer_has_state(policy.optimizer)
    save_model_checkpoint(
        policy.module, tmp / "weights", hf_dir=hf_dir,
        extra_state=(lambda model_sd: {"optimizer": policy.optimizer.sharded_state_dict(model_sd)})
        if with_optimizer else None,
    )
    with naming_write_errors(tmp, f"checkpoint {final}"):
        _save_durably(rng_state(), tmp / "rng" / f"rank_{st.rank:05d}.pt")
        if st.rank == 0:
            _save_durably(
                {
                    "step": step,
                    "run_id": run_id,
                    "scheduler": policy.scheduler.state_dict(),
                    "optimizer_steps": policy.optimizer_steps,
                    "skipped_steps": policy.skipped_steps,
                    "world_size": st.world_size,
                    "with_optimizer": with_optimizer,
                    "extra": extra,
                },
                tmp / TRAINER_STATE,
            )
    _barrier()
    if st.rank == 0:
        with naming_write_errors(root, f"checkpoint {final}"):
            commit_temp_dir(tmp, final)
            durable_write_text(root / LATEST, final.name)
        prune_checkpoints(root, keep_last, keep=final, run_id=run_id)
    _barrier()
    return final


def prune_checkpoints(root: str | Path, keep_last: int, *, keep: Path, run_id: str | None) -> list[Path]:
    """Delete the run's oldest checkpoints beyond the newest ``keep_last`` (0 keeps all),
    never ``keep`` (the checkpoint just written) nor another run's; and any stale
    ``step_*.tmp`` of a save that died. Returns what was deleted."""
    root = Path(root)
    deleted = []
    if keep_last > 0:
        ours = list_checkpoints(root, run_id)
        excess = len(ours) - keep_last
        for old in [p for p in ours if p != keep][:max(excess, 0)]:
            shutil.rmtree(old, ignore_errors=True)
            deleted.append(old)
    for stale in root.glob("step_*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    return deleted


def read_trainer_extra(path: str | Path) -> dict[str, Any]:
    """The trainer's own state (``extra`` of ``save_checkpoint``: data sampler, eval history)
    of a checkpoint, without loading any weights."""
    state_file = Path(path) / TRAINER_STATE
    if not state_file.is_file():
        raise CheckpointError(
            f"{path} is not a complete training checkpoint (no {TRAINER_STATE}); "
            "give a checkpoints/step_* directory of a finished save"
        )
    return load_side_file(state_file)["extra"]


def load_checkpoint(path: str | Path, policy, st: ParallelState) -> dict[str, Any]:
    """Restore ``policy`` and this rank's RNG from a checkpoint; returns the trainer's
    ``extra`` state and the step."""
    from megatron_hpt.models.checkpoint import load_model_checkpoint

    path = Path(path)
    if not (path / TRAINER_STATE).is_file():
        raise CheckpointError(f"{path} is not a complete training checkpoint (no {TRAINER_STATE})")
    state = load_side_file(path / TRAINER_STATE)
    with_optimizer = state.get("with_optimizer", True)
    loaded = load_model_checkpoint(
        policy.module, path / "weights",
        extra_state=(lambda model_sd: {"optimizer": policy.optimizer.sharded_state_dict(model_sd, is_loading=True)})
        if with_optimizer else None,
    )
    if with_optimizer:
        policy.optimizer.load_state_dict(loaded["optimizer"])
    else:
        for sub in getattr(policy.optimizer, "chained_optimizers", [policy.optimizer]):
            sub.optimizer.state.clear()
    policy.scheduler.load_state_dict(state["scheduler"])
    policy.optimizer_steps = state["optimizer_steps"]
    policy.skipped_steps = state["skipped_steps"]
    rng_file = path / "rng" / f"rank_{st.rank:05d}.pt"
    if rng_file.is_file() and state["world_size"] == st.world_size:
        set_rng_state(load_side_file(rng_file))
    return {"step": state["step"], "extra": state["extra"]}
