"""Training checkpoints: model and optimizer in megatron's ``dist_checkpointing``
format, plus the LR schedule, counters, the caller's state (data sampler, trainer
progress) and every rank's RNG states; written atomically, the last k kept.

Layout of a checkpoint root::

    root/step_000012/weights/         model + optimizer (``megatron_hpt.models.checkpoint``)
    root/step_000012/trainer_state.pt LR schedule, counters, the trainer's own state
    root/step_000012/rng/rank_*.pt    every rank's RNG states
    root/latest                       the name of the newest complete checkpoint

``weights/`` is a model checkpoint like the ones conversion writes, so
``megatron-hpt convert megatron-to-hf`` exports any training checkpoint.

A checkpoint is written into ``step_X.tmp`` and renamed once every rank is done,
and ``latest`` is replaced atomically after the rename, so a run killed in the
middle of a save leaves the previous checkpoint loadable.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from megatron_hpt.parallel import ParallelState, collective_device

_STEP_DIR = re.compile(r"^step_(\d{6,})$")


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def rng_state() -> dict[str, Any]:
    """Python, numpy, torch (CPU and CUDA) and megatron's tracker states of this rank."""
    from megatron.core import tensor_parallel

    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def optimizer_has_state(optimizer) -> bool:
    """Whether the (chained) megatron optimizer has taken a step yet (on any rank)."""
    subs = getattr(optimizer, "chained_optimizers", [optimizer])
    flag = torch.tensor([int(any(len(sub.optimizer.state) > 0 for sub in subs if sub.optimizer is not None))],
                        device=collective_device())
    if dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete checkpoint under ``root``, or None."""
    root = Path(root)
    pointer = root / "latest"
    if pointer.is_file():
        candidate = root / pointer.read_text().strip()
        if candidate.is_dir():
            return candidate
    steps = sorted(p for p in root.glob("step_*") if _STEP_DIR.match(p.name) and p.is_dir())
    return steps[-1] if steps else None


def save_checkpoint(
    root: str | Path, step: int, policy, st: ParallelState, extra: dict[str, Any], keep_last: int = 3,
    hf_dir: str | Path | None = None,
) -> Path:
    """Save ``policy`` (model, optimizer, schedule, counters), ``extra`` (rank 0's
    picklable trainer state) and every rank's RNG at ``root/step_<step>``; ``hf_dir``
    (config and tokenizer) is recorded so the checkpoint converts back to HF."""
    from megatron_hpt.models.checkpoint import save_model_checkpoint

    root = Path(root)
    final = root / f"step_{step:06d}"
    tmp = root / f"step_{step:06d}.tmp"
    if st.rank == 0:
        root.mkdir(parents=True, exist_ok=True)
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
    torch.save(rng_state(), tmp / "rng" / f"rank_{st.rank:05d}.pt")
    if st.rank == 0:
        torch.save(
            {
                "step": step,
                "scheduler": policy.scheduler.state_dict(),
                "optimizer_steps": policy.optimizer_steps,
                "skipped_steps": policy.skipped_steps,
                "world_size": st.world_size,
                "with_optimizer": with_optimizer,
                "extra": extra,
            },
            tmp / "trainer_state.pt",
        )
    _barrier()
    if st.rank == 0:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        pointer_tmp = root / "latest.tmp"
        pointer_tmp.write_text(final.name)
        os.replace(pointer_tmp, root / "latest")
        _prune(root, keep_last)
    _barrier()
    return final


def _prune(root: Path, keep_last: int) -> None:
    steps = sorted(p for p in root.glob("step_*") if _STEP_DIR.match(p.name))
    for old in steps[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob("step_*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)


def read_trainer_extra(path: str | Path) -> dict[str, Any]:
    """The trainer's own state (``extra`` of ``save_checkpoint``: data sampler, eval history)
    of a checkpoint, without loading any weights."""
    state_file = Path(path) / "trainer_state.pt"
    if not state_file.is_file():
        raise FileNotFoundError(
            f"{path} is not a complete training checkpoint (no trainer_state.pt); "
            "give a checkpoints/step_* directory of a finished save"
        )
    return torch.load(state_file, weights_only=False)["extra"]


def load_checkpoint(path: str | Path, policy, st: ParallelState) -> dict[str, Any]:
    """Restore ``policy`` and this rank's RNG from a checkpoint; returns the trainer's
    ``extra`` state and the step."""
    from megatron_hpt.models.checkpoint import load_model_checkpoint

    path = Path(path)
    if not (path / "trainer_state.pt").is_file():
        raise FileNotFoundError(f"{path} is not a complete training checkpoint (no trainer_state.pt)")
    state = torch.load(path / "trainer_state.pt", weights_only=False)
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
        set_rng_state(torch.load(rng_file, weights_only=False))
    return {"step": state["step"], "extra": state["extra"]}
