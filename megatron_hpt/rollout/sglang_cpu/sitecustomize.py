"""Start-up hook for a real SGLang server on a CPU-only machine.

SGLang imports ``triton`` and ``torchvision`` at module level in code paths that
the CPU torch-native backend never runs, and PyPI only has CUDA builds of both.
``vllm._custom_ops.rotary_embedding`` is imported (not called) by the rotary
layer on this path. This hook, active only in the processes that get this folder
on PYTHONPATH, waits for the first ``import sglang``; at that moment it lets torch
and transformers look for triton/torchvision for real (they are absent, and both
libraries cache that answer), and only then installs permissive stand-in modules
for those names, so SGLang's imports resolve while torch keeps its non-triton paths.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import types

_STUBBED_ROOTS = ("triton", "torchvision", "vllm")


class _StandInClass:
    """Any capitalized attribute of a stand-in module: subclassable, constructible."""

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs


class _StandInModule(types.ModuleType):
    """A module whose every attribute exists: lower-case names are sub-modules
    (usable as no-op decorators), capitalized names are classes."""

    def __init__(self, name: str):
        super().__init__(name)
        self.__path__ = []
        self.__spec__ = importlib.machinery.ModuleSpec(name, _LOADER, is_package=True)

    def __getattr__(self, attr: str):
        if attr.startswith("__") and attr.endswith("__"):
            raise AttributeError(attr)
        full = f"{self.__name__}.{attr}"
        if attr[:1].isupper():
            value = type(attr, (_StandInClass,), {"__module__": self.__name__})
        else:
            value = sys.modules.get(full) or _register(full)
        setattr(self, attr, value)
        return value

    def __call__(self, *args, **kwargs):
        # `@triton.jit` and `@triton.jit(...)` both leave the function as it is.
        if len(args) == 1 and callable(args[0]) and not kwargs:
            return args[0]
        return lambda fn: fn

    def __bool__(self) -> bool:
        return False

    def __iter__(self):
        return iter(())

    def __repr__(self) -> str:
        return f"<cpu stand-in {self.__name__!r}>"


class _StandInLoader(importlib.abc.Loader):
    def create_module(self, spec):
        return sys.modules.get(spec.name) or _register(spec.name)

    def exec_module(self, module) -> None:
        pass


_LOADER = _StandInLoader()


def _register(name: str) -> _StandInModule:
    module = _StandInModule(name)
    sys.modules[name] = module
    parent, _, child = name.rpartition(".")
    if parent and parent in sys.modules:
        setattr(sys.modules[parent], child, module)
    return module


def _cdiv(a: int, b: int) -> int:
    return -(a // -b)


def _next_power_of_2(n: int) -> int:
    return 1 << (n - 1).bit_length() if n > 0 else 1


class _StandInFinder(importlib.abc.MetaPathFinder):
    """Answers imports of the stubbed roots (and their sub-modules) with stand-ins."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".", 1)[0] in _STUBBED_ROOTS:
            return importlib.machinery.ModuleSpec(fullname, _LOADER, is_package=True)
        return None


def _install_stand_ins() -> None:
    # Let torch and transformers record the truth (no triton, no torchvision) first.
    import torch  # noqa: F401
    import torch.utils._triton as torch_triton
    from transformers.utils import import_utils

    torch_triton.has_triton_package()
    torch_triton.has_triton()
    for check in ("is_torchvision_available", "is_triton_available", "is_vision_available"):
        fn = getattr(import_utils, check, None)
        if fn is not None:
            fn()

    sys.meta_path.insert(0, _StandInFinder())
    triton = _register("triton")
    triton.__version__ = "3.4.0"
    triton.cdiv = _cdiv
    triton.next_power_of_2 = _next_power_of_2
    language = _register("triton.language")
    language.constexpr = type("constexpr", (_StandInClass,), {})
    jit = _register("triton.runtime.jit")
    jit.JITFunction = type("JITFunction", (), {})
    autotuner = _register("triton.runtime.autotuner")
    autotuner.OutOfResources = type("OutOfResources", (Exception,), {})
    autotuner.PTXASError = type("PTXASError", (Exception,), {})
    torchvision = _register("torchvision")
    torchvision.__version__ = "0.0.0+cpu-stand-in"
    custom_ops = _register("vllm._custom_ops")

    def rotary_embedding(*args, **kwargs):
        raise RuntimeError("vllm._custom_ops.rotary_embedding is a CPU stand-in and must not be called")

    custom_ops.rotary_embedding = rotary_embedding


class _OnFirstSGLangImport(importlib.abc.MetaPathFinder):
    """Installs the stand-ins just before ``sglang`` itself is imported."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname == "sglang":
            sys.meta_path.remove(self)
            _install_stand_ins()
        return None


sys.meta_path.insert(0, _OnFirstSGLangImport())
