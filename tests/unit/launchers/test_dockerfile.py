"""The Dockerfile: hadolint passes, and every version it installs agrees with the pins
the project tests elsewhere (constraints/*.txt, setup.py's ranges). No Docker engine
runs here, so the image itself is not built by the tests."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

REPO = Path(__file__).resolve().parents[3]
DOCKERFILE = REPO / "Dockerfile"
HADOLINT = Path(sys.executable).parent / "hadolint"


def _constraint_pins() -> dict[str, dict[str, str]]:
    """{package: {constraints file: pinned version}} over constraints/*.txt."""
    pins: dict[str, dict[str, str]] = {}
    for path in sorted((REPO / "constraints").glob("*.txt")):
        for line in path.read_text().splitlines():
            m = re.match(r"^([A-Za-z0-9_.\-]+)==([^\s;#]+)", line.strip())
            if m:
                pins.setdefault(_norm(m.group(1)), {})[path.name] = m.group(2)
    return pins


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _setup_requirements() -> dict[str, Requirement]:
    text = (REPO / "setup.py").read_text()
    reqs = {}
    for spec in re.findall(r'"([A-Za-z0-9_.\-\[\]]+\s*(?:[<>=!~]=?[^"]*)?)"', text):
        try:
            req = Requirement(spec)
        except Exception:
            continue
        if req.specifier:
            reqs[_norm(req.name)] = req
    return reqs


def _dockerfile_versions() -> dict[str, str]:
    """Versions the Dockerfile pins, by package: its ``ARG NAME_VERSION=x`` lines. Every
    ``==`` in an install line must use one of them (checked here), so these are all."""
    text = DOCKERFILE.read_text()
    versions = {
        _norm(name.replace("_", "-")): version
        for name, version in re.findall(r"^ARG ([A-Z_]+)_VERSION=(\S+)$", text, flags=re.M)
    }
    for pinned in re.findall(r"[A-Za-z0-9\]]==(\S+)", text):
        assert re.fullmatch(r'\$\{[A-Z_]+_VERSION\}"?', pinned), f"a literal pin in the Dockerfile: =={pinned}"
    return versions


def test_dockerfile_passes_hadolint():
    proc = subprocess.run([str(HADOLINT), str(DOCKERFILE)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerfile_pins_agree_with_the_tested_pins():
    versions = _dockerfile_versions()
    assert set(versions) == {"megatron-core", "sglang", "uv"}, versions
    pins, reqs = _constraint_pins(), _setup_requirements()
    # SGLang: the version the CPU peer environment pins (constraints/sglang-cpu.txt).
    assert pins["sglang"] and set(pins["sglang"].values()) == {versions["sglang"]}, pins["sglang"]
    # megatron-core: 0.16.1 is the CPU (Python 3.11) pin; the Python 3.12 image takes a
    # newer release that setup.py's range admits.
    assert Version(versions["megatron-core"]) in reqs["megatron-core"].specifier
    assert Version(versions["sglang"]) in reqs["sglang"].specifier


def test_nemo_run_in_the_image_comes_from_the_launch_constraints():
    text = DOCKERFILE.read_text()
    install = next(line for line in text.splitlines() if "/opt/nemo-run/bin/python" in line and "pip install" in line)
    assert "-c constraints/launch.txt" in install
    pins, reqs = _constraint_pins(), _setup_requirements()
    nemo_run, leptonai = pins["nemo-run"]["launch.txt"], pins["leptonai"]["launch.txt"]
    assert Version(nemo_run) in reqs["nemo-run"].specifier
    assert Version(leptonai) in reqs["leptonai"].specifier  # below 0.47, which breaks nemo-run's import
    # No torch in the launch environment: the launchers only build commands.
    assert "torch" not in pins or "launch.txt" not in pins["torch"]


def test_image_holds_the_base_torch_and_puts_sglang_and_nemo_run_in_their_own_venvs():
    text = DOCKERFILE.read_text()
    assert re.search(r"^FROM \$\{BASE_IMAGE\}$", text, flags=re.M)
    assert re.search(r"^ARG BASE_IMAGE=nvcr\.io/nvidia/pytorch:\S+-py3$", text, flags=re.M)
    # The package install is constrained by the base image's own torch / TE / apex.
    main_install = next(line for line in text.splitlines() if "megatron-core==" in line)
    assert "-c /tmp/base-image-pins.txt" in main_install
    assert "uv venv" in text and "/opt/sglang" in text and "/opt/nemo-run" in text
    # The launchers' defaults point at these paths.
    assert "WORKDIR /opt/megatron-hpt" in text
    assert "/opt/sglang/bin/python" in (REPO / "launchers" / "slurm" / "profiles" / "gpu.sh").read_text()
    assert "${CONTAINER_LAUNCH_DIR:-/opt/megatron-hpt/launchers/slurm}" in (REPO / "launchers" / "slurm" / "common.sh").read_text()
    assert 'IMAGE_REPO_ROOT = "/opt/megatron-hpt"' in (REPO / "launchers" / "nemo_run" / "hpt_jobs.py").read_text()
