"""ParallelConfig: how the trainer's ranks split the model and the data."""

from __future__ import annotations

from dataclasses import dataclass

from megatron_hpt.config import checks


@dataclass(kw_only=True, frozen=True)
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    """Ranks that split each weight matrix (Megatron TP)."""
    pipeline_model_parallel_size: int = 1
    """Ranks that split the layers into consecutive stages (Megatron PP)."""
    backend: str = "auto"
    """torch.distributed backend: "auto" picks nccl with CUDA, gloo without."""
    seed: int = 1234
    """Seed for Megatron's model-parallel RNG states (weight init, dropout)."""
    timeout_minutes: int = 30
    """Collective timeout; a hung rank fails after this long instead of forever."""

    def __post_init__(self) -> None:
        for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.backend not in ("auto", "nccl", "gloo"):
            raise ValueError(f"backend must be auto, nccl or gloo, got {self.backend!r}")
        checks.non_negative(self, "seed")
        checks.at_least(self, 1, "timeout_minutes")

    @property
    def model_parallel_size(self) -> int:
        return self.tensor_model_parallel_size * self.pipeline_model_parallel_size

    def data_parallel_size(self, world_size: int) -> int:
        if world_size % self.model_parallel_size:
            raise ValueError(
                f"world size {world_size} is not divisible by tensor_model_parallel_size x "
                f"pipeline_model_parallel_size = {self.model_parallel_size}"
            )
        return world_size // self.model_parallel_size
