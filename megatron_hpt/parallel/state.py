"""Start torch.distributed and Megatron's model-parallel groups from a ParallelConfig."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from megatron_hpt.compat import apply_cpu_compat
from megatron_hpt.parallel.collectives import check_requested, install_collective_device_check
from megatron_hpt.parallel.config import ParallelConfig


@dataclass(frozen=True)
class ParallelState:
    """Ranks, sizes and groups of this process, read once from megatron."""

    world_size: int
    rank: int
    tp_size: int
    tp_rank: int
    pp_size: int
    pp_rank: int
    dp_size: int
    dp_rank: int
    tp_group: object
    pp_group: object
    dp_group: object
    mp_group: object
    device: torch.device

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1


_state: ParallelState | None = None


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def init_parallel(config: ParallelConfig) -> ParallelState:
    """Initialize torch.distributed (from torchrun's env, or a single process)
    and megatron's model-parallel state; returns this rank's ParallelState."""
    global _state
    from megatron.core import parallel_state as mps
    from megatron.core import tensor_parallel

    cuda = torch.cuda.is_available()
    apply_cpu_compat()
    if check_requested():
        install_collective_device_check()
    backend = config.backend if config.backend != "auto" else ("nccl" if cuda else "gloo")
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        rank, world = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1)
        if cuda:
            torch.cuda.set_device(_env_int("LOCAL_RANK", 0))
        dist.init_process_group(
            backend=backend,
            rank=rank,
            world_size=world,
            timeout=timedelta(minutes=config.timeout_minutes),
        )
    world = dist.get_world_size()
    config.data_parallel_size(world)  # raises on a layout that does not divide the world
    if mps.model_parallel_is_initialized():
        mps.destroy_model_parallel()
    mps.initialize_model_parallel(
        tensor_model_parallel_size=config.tensor_model_parallel_size,
        pipeline_model_parallel_size=config.pipeline_model_parallel_size,
        distributed_timeout_minutes=config.timeout_minutes,
        create_gloo_process_groups=not cuda,
    )
    tensor_parallel.model_parallel_cuda_manual_seed(config.seed)
    _state = ParallelState(
        world_size=world,
        rank=dist.get_rank(),
        tp_size=mps.get_tensor_model_parallel_world_size(),
        tp_rank=mps.get_tensor_model_parallel_rank(),
        pp_size=mps.get_pipeline_model_parallel_world_size(),
        pp_rank=mps.get_pipeline_model_parallel_rank(),
        dp_size=mps.get_data_parallel_world_size(),
        dp_rank=mps.get_data_parallel_rank(),
        tp_group=mps.get_tensor_model_parallel_group(),
        pp_group=mps.get_pipeline_model_parallel_group(),
        dp_group=mps.get_data_parallel_group(),
        mp_group=mps.get_model_parallel_group(),
        device=torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu"),
    )
    return _state


def parallel_state() -> ParallelState:
    """This rank's ParallelState; init_parallel must have run."""
    if _state is None:
        raise RuntimeError("init_parallel() has not been called in this process")
    return _state


def destroy_parallel() -> None:
    """Tear down megatron's groups and the process group (end of a run or a test)."""
    global _state
    from megatron.core import parallel_state as mps

    if mps.model_parallel_is_initialized():
        mps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
    _state = None
