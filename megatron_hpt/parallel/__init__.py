"""Process groups: torch.distributed and Megatron's model-parallel state.

The only package that reads megatron's global ``parallel_state``; everything
else receives sizes, ranks and groups from here.
"""

from megatron_hpt.parallel.collectives import collective_device
from megatron_hpt.parallel.config import ParallelConfig
from megatron_hpt.parallel.state import (
    ParallelState,
    destroy_parallel,
    init_parallel,
    parallel_state,
)

__all__ = ["collective_device", "ParallelConfig", "ParallelState", "destroy_parallel", "init_parallel", "parallel_state"]
