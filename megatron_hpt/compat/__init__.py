"""megatron-core without CUDA: the one place that makes it run, for 0.16.1 to 0.19.x.

``imports``: the import-time shim for megatron-core 0.19 on machines without triton (a
stand-in for the triton paged-stash kernels), installed by ``megatron_hpt/__init__``
before anything imports megatron.

``cpu``: megatron-core assumes a CUDA device in a handful of places (device queries and
streams, the RNG tracker, the global memory buffer, tensors created with ``device="cuda"``
in schedules and DDP, gradient clipping). ``apply_cpu_compat`` patches exactly those,
once, and only when CUDA is absent; on a GPU it does nothing. Every patch is listed in
``PATCHES`` and tested on its own.

The ``cpu`` names load on first use, so that importing the package (which every process
does, reward workers included) does not import torch.
"""

from __future__ import annotations

__all__ = ["PATCHES", "apply_cpu_compat", "cpu_compat_active"]


def __getattr__(name: str):
    if name in __all__:
        from megatron_hpt.compat import cpu

        return getattr(cpu, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
