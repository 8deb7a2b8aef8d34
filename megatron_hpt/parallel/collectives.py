"""Where the tensors of a collective live, and a check that the project puts them there.

NCCL only takes tensors on the rank's GPU; gloo takes CPU tensors. ``collective_device(group)``
is the project's answer for a process group: the current CUDA device when the group's
backend is NCCL, the CPU otherwise. Every tensor the project hands to a collective is
created there (``torch.tensor(values, device=collective_device(group))``), never left on
the default (CPU) device: on GPUs that is an error from NCCL at the first collective.

The check (``install_collective_device_check``; ``init_parallel`` installs it in every rank
when ``MEGATRON_HPT_CHECK_COLLECTIVE_DEVICES=1``, as the test suite sets it) wraps
torch.distributed's tensor collectives and raises ``CollectiveDeviceError`` when a tensor
that the project's code (``megatron_hpt``, ``checkpoints_tools``) hands to one is not on
``collective_device(group)``. On a GPU machine that compares real devices. On a CPU
machine, where every group is gloo and every tensor is on the CPU, the check simulates
the GPU run it stands for:

- ``collective_device`` answers as for NCCL, ``cuda:0`` (the CPU compatibility layer
  creates such tensors on the CPU);
- a tensor the project's code creates with a factory (``torch.tensor``, ``torch.zeros``,
  ...) without a ``device`` is marked as a host tensor: it would be on the CPU on a GPU
  machine too. Tensors computed from other tensors (model outputs, gradients) are on the
  model's device and carry no mark.

A marked tensor handed to a collective is the error NCCL would raise. The mark is coarse
on purpose (it does not follow arithmetic), so the check can miss a case but does not
report a tensor that would be on the GPU. It also holds after ``.to(device)``, which on a
CPU machine returns the same tensor: create collective tensors on their device directly.
"""

from __future__ import annotations

import functools
import inspect
import os
import sys
from typing import Callable

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

CHECK_ENV = "MEGATRON_HPT_CHECK_COLLECTIVE_DEVICES"
"""Set to 1 to install the check in every rank at ``init_parallel`` (the tests do)."""

SIMULATED_DEVICE = torch.device("cuda", 0)
"""The collective device the check assumes on a CPU machine: NCCL's, as on GPUs."""

TENSOR_COLLECTIVES = (
    "all_reduce", "broadcast", "reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter",
    "reduce_scatter_tensor", "gather", "scatter", "all_to_all", "all_to_all_single",
)
"""Point-to-point calls are not wrapped: megatron's pipeline code passes ``isend``/``irecv``
to ``P2POp``, which checks their identity (and the project makes no such calls)."""
_FACTORIES = ("tensor", "as_tensor", "zeros", "ones", "empty", "full", "arange")
_PROJECT_PACKAGES = ("megatron_hpt.", "checkpoints_tools.")
_EXEMPT_PACKAGES = ("megatron_hpt.compat.", "megatron_hpt.parallel.collectives")
"""The CPU compatibility layer runs only on CPU machines (gloo) by design."""

_HOST_MARK = "_megatron_hpt_host_tensor"


class CollectiveDeviceError(AssertionError):
    """A tensor handed to a collective is not on the process group's device."""


_installed: dict | None = None


def check_installed() -> bool:
    return _installed is not None


def simulating() -> bool:
    """Whether the check stands in for a GPU run on a CPU machine."""
    return _installed is not None and _installed["simulate"]


def collective_device(group=None) -> torch.device:
    """The device of tensors handed to a collective over ``group`` (None: the default group)."""
    if simulating():
        return SIMULATED_DEVICE
    backend = str(dist.get_backend(group)) if dist.is_initialized() else "gloo"
    if "nccl" in backend:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _caller_is_project(depth: int) -> str | None:
    """'module:line' of the calling frame when it is the project's code (not exempt), else None."""
    frame = sys._getframe(depth + 1)
    module = frame.f_globals.get("__name__", "")
    if module.startswith(_PROJECT_PACKAGES) and not module.startswith(_EXEMPT_PACKAGES):
        return f"{module}:{frame.f_lineno}"
    return None


def is_host_tensor(t: torch.Tensor) -> bool:
    """Marked by the check: created by the project without a device (CPU on any machine)."""
    return bool(getattr(t, _HOST_MARK, False))


def tensor_device(t: torch.Tensor) -> torch.device:
    """The tensor's device, or on a CPU machine under the check, where it would be on GPUs."""
    if simulating():
        return torch.device("cpu") if is_host_tensor(t) else SIMULATED_DEVICE
    return t.device


def _tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for t in value if isinstance(t, torch.Tensor)]
    return []


def _wrap_collective(name: str, fn: Callable) -> Callable:
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def checked(*args, **kwargs):
        where = _caller_is_project(1)
        if where is not None:
            bound = signature.bind_partial(*args, **kwargs)
            group = bound.arguments.get("group")
            want = collective_device(group)
            for arg, value in bound.arguments.items():
                for t in _tensors(value):
                    have = tensor_device(t)
                    if have != want:
                        raise CollectiveDeviceError(
                            f"{where}: torch.distributed.{name}({arg}=...) got a tensor on {have}, but the "
                            f"group's collective device is {want} ({'NCCL on GPUs' if want.type == 'cuda' else 'gloo'}): "
                            "create it with device=collective_device(group)"
                        )
        return fn(*args, **kwargs)

    checked.__wrapped_collective__ = fn
    return checked


_FACTORY_FUNCS = frozenset(getattr(torch, name) for name in _FACTORIES)


class HostTensorMarker(TorchFunctionMode):
    """Marks the tensors the project's code creates with a factory and no ``device``. A mode
    sees torch's own functions, so ``torch.*`` stays untouched (torch's ``with
    torch.device(...)`` looks its constructors up by identity)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if (func in _FACTORY_FUNCS and kwargs.get("device") is None and isinstance(out, torch.Tensor)
                and not (args and isinstance(args[0], torch.Tensor))  # keeps its source's device
                and _caller_is_project(1)):
            setattr(out, _HOST_MARK, True)
        return out


def install_collective_device_check() -> None:
    """Wrap torch.distributed's tensor collectives with the device check (idempotent);
    on a CPU machine also mark the project's host tensors (see the module docstring)."""
    global _installed
    if _installed is not None:
        return
    simulate = not torch.cuda.is_available()
    collectives = {}
    for name in TENSOR_COLLECTIVES:
        fn = getattr(dist, name, None)
        if fn is not None:
            collectives[name] = fn
            setattr(dist, name, _wrap_collective(name, fn))
    marker = None
    if simulate:
        marker = HostTensorMarker()
        marker.__enter__()  # stays on the mode stack for the life of the process
    _installed = {"simulate": simulate, "collectives": collectives, "marker": marker}


def uninstall_collective_device_check() -> None:
    """Undo ``install_collective_device_check`` (tests of the check itself)."""
    global _installed
    if _installed is None:
        return
    for name, fn in _installed["collectives"].items():
        setattr(dist, name, fn)
    if _installed["marker"] is not None:
        _installed["marker"].__exit__(None, None, None)
    _installed = None


def check_requested() -> bool:
    return os.environ.get(CHECK_ENV) == "1"
