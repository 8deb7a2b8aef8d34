"""CPU backend for megatron-core: the one place that makes it run without CUDA.

megatron-core assumes a CUDA device in a handful of places (device queries,
the RNG tracker, the global memory buffer, tensors created with
``device="cuda"`` in schedules and DDP, gradient clipping). ``apply_cpu_compat``
patches exactly those, once, and only when CUDA is absent; on a GPU it does
nothing. Every patch is listed in ``PATCHES`` and tested on its own.
"""

from megatron_hpt.compat.cpu import PATCHES, apply_cpu_compat, cpu_compat_active

__all__ = ["PATCHES", "apply_cpu_compat", "cpu_compat_active"]
