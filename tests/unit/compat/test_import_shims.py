"""The import-time shim for megatron-core 0.19 without triton: the hook serves the stand-in
for the paged-stash kernels exactly when triton is missing, it is installed by importing
the package, and megatron imports through it (in a fresh interpreter each)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import subprocess
import sys
import textwrap

from megatron_hpt.compat import imports

MEGATRON_VERSION = tuple(int(x) for x in importlib.metadata.version("megatron-core").split(".")[:2])


def test_hook_serves_the_stand_in_only_without_triton(monkeypatch):
    hook = imports.MegatronImportShims()
    monkeypatch.setattr(imports, "triton_importable", lambda: False)
    spec = hook.find_spec(imports.PAGED_STASH_MODULE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.__name__ == imports.PAGED_STASH_MODULE
    assert module.GLOBAL_BLOCK_SIZE == 1024
    assert module.paged_stash_copy_kernel is None and module.paged_stash_pop_kernel is None
    assert hook.find_spec("megatron.core.transformer.moe.ops") is None  # nothing else
    assert hook.find_spec("triton") is None
    monkeypatch.setattr(imports, "triton_importable", lambda: True)
    assert hook.find_spec(imports.PAGED_STASH_MODULE) is None  # the real kernels where triton is


def test_importing_the_package_installs_the_hook_once():
    import megatron_hpt  # noqa: F401

    hooks = [f for f in sys.meta_path if isinstance(f, imports.MegatronImportShims)]
    assert len(hooks) == 1 and sys.meta_path[0] is hooks[0]
    assert imports.install_import_shims() is hooks[0]
    assert sum(isinstance(f, imports.MegatronImportShims) for f in sys.meta_path) == 1


def _fresh(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120)


def test_megatron_imports_through_the_package_without_triton():
    proc = _fresh(f"""
        import importlib.util, sys
        assert importlib.util.find_spec("triton") is None
        import megatron_hpt
        import megatron.core
        from megatron.core.pipeline_parallel import get_forward_backward_func
        from megatron.core.models.gpt import GPTModel
        stash = sys.modules.get({imports.PAGED_STASH_MODULE!r})
        print("stub" if stash is not None and stash.paged_stash_copy_kernel is None else "absent" if stash is None else "real")
    """)
    assert proc.returncode == 0, proc.stderr[-2000:]
    # 0.19 loads the module while importing megatron.core; earlier releases have none
    assert proc.stdout.split()[-1] == ("stub" if MEGATRON_VERSION >= (0, 19) else "absent")


def test_without_the_package_megatron_019_fails_on_triton():
    """What the shim is for: 0.19 does not import without triton on its own (earlier releases do)."""
    proc = _fresh("import megatron.core")
    if MEGATRON_VERSION >= (0, 19):
        assert proc.returncode != 0 and "No module named 'triton'" in proc.stderr
    else:
        assert proc.returncode == 0, proc.stderr[-2000:]
