"""SGLang's own JSON contract for the HTTP API, ``sglang/api/v1/api_types.py``, loaded by
file path (it needs only msgspec, no torch) so tests can decode every request the client
sends and every reply the server returns with SGLang's decoders.

The project ships no SGLang code: the file is extracted from the pinned sglang wheel,
downloaded with pip (``pip download --no-deps``), into a git-ignored cache folder.

    python -m megatron_hpt.rollout.sglang_cpu.contract    # fetch it now (make sglang-contract)
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from types import ModuleType

SGLANG_VERSION = "0.5.23"
MEMBER = "sglang/api/v1/api_types.py"
DEFAULT_CACHE = Path(__file__).resolve().parents[3] / ".cache" / "sglang-api"


def contract_path(cache_dir: Path = DEFAULT_CACHE, version: str = SGLANG_VERSION) -> Path:
    return Path(cache_dir) / version / "api_types.py"


def fetch_contract(cache_dir: Path = DEFAULT_CACHE, version: str = SGLANG_VERSION) -> Path:
    """The cached contract file, downloading the sglang wheel once to extract it."""
    target = contract_path(cache_dir, version)
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", tmp, f"sglang=={version}"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("sglang-*.whl"))
        if done.returncode != 0 or not wheels:
            raise RuntimeError(f"could not download the sglang {version} wheel to read its JSON contract:\n{done.stderr[-2000:]}")
        with zipfile.ZipFile(wheels[0]) as whl:
            data = whl.read(MEMBER)
    partial = target.with_suffix(".tmp")
    partial.write_bytes(data)
    partial.replace(target)
    return target


def load_contract(cache_dir: Path = DEFAULT_CACHE, version: str = SGLANG_VERSION) -> ModuleType:
    """The contract module (GenerateRequest, GenerateResponse, JsonContractError, ...)."""
    path = fetch_contract(cache_dir, version)
    spec = importlib.util.spec_from_file_location(f"sglang_api_types_{version.replace('.', '_')}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # msgspec resolves the module's annotations through sys.modules
    spec.loader.exec_module(module)
    return module


if __name__ == "__main__":
    print(fetch_contract())
