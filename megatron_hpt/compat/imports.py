"""Import-time shim that lets megatron-core 0.19 import on a machine without triton.

``import megatron.core`` in 0.19 reaches ``megatron.core.transformer.moe.ops.paged_stash``
(from the pipeline schedules), which imports triton to define two MoE kernels that
dense models never launch. ``install_import_shims`` puts an import hook first on
``sys.meta_path``, once per process (``megatron_hpt/__init__`` calls it, so it is in
place before anything imports megatron), that serves a stand-in for that module when
triton cannot be imported: ``GLOBAL_BLOCK_SIZE`` as in megatron, the kernels ``None``
(launching one fails loudly). Where triton is installed (GPU machines) the hook answers
nothing, and megatron-core 0.16-0.18 have no such module.

This module imports neither torch nor megatron: every process of the project imports
the package, reward workers included, which never load torch.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types

PAGED_STASH_MODULE = "megatron.core.transformer.moe.ops.paged_stash"
PAGED_STASH_BLOCK_SIZE = 1024
"""``GLOBAL_BLOCK_SIZE`` of megatron-core 0.19.2's paged-stash kernels."""


def triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def paged_stash_stub() -> types.ModuleType:
    """The stand-in for megatron's triton paged-stash kernels (MoE only)."""
    module = types.ModuleType(PAGED_STASH_MODULE, "Stand-in for megatron's triton paged-stash kernels (no triton here).")
    module.GLOBAL_BLOCK_SIZE = PAGED_STASH_BLOCK_SIZE
    module.paged_stash_copy_kernel = None
    module.paged_stash_pop_kernel = None
    module.__all__ = ["GLOBAL_BLOCK_SIZE", "paged_stash_copy_kernel", "paged_stash_pop_kernel"]
    return module


class _StubLoader(importlib.abc.Loader):
    def create_module(self, spec):
        return paged_stash_stub()

    def exec_module(self, module) -> None:
        return None


class MegatronImportShims(importlib.abc.MetaPathFinder):
    """The import hook: answers for the paged-stash module only, and only without triton."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname == PAGED_STASH_MODULE and not triton_importable():
            return importlib.machinery.ModuleSpec(fullname, _StubLoader())
        return None


def installed_shims() -> MegatronImportShims | None:
    return next((f for f in sys.meta_path if isinstance(f, MegatronImportShims)), None)


def install_import_shims() -> MegatronImportShims:
    """Put the hook first on ``sys.meta_path`` (idempotent)."""
    hook = installed_shims()
    if hook is None:
        hook = MegatronImportShims()
        sys.meta_path.insert(0, hook)
    return hook
