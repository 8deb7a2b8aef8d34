"""The stages import one way (STYLE.md §1): importing every module of a stage, in a
fresh interpreter, loads no stage to its right, and the leaf stages stay free of
heavy dependencies (rewards: no torch; rollout: no megatron)."""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys

import pytest

import megatron_hpt

FOUNDATIONS = {"compat", "parallel", "config"}
# stage -> the megatron_hpt packages it may load (itself and the foundations implied)
ALLOWED = {
    "data": set(),
    "rewards": {"data"},
    "rollout": {"data", "rewards"},
    "losses": {"data", "rewards", "rollout"},
    "models": {"data", "rewards", "rollout", "losses"},
    "training": {"data", "rewards", "rollout", "losses", "models"},
    "eval": {"data", "rewards", "rollout"},
    "trainer": {"data", "rewards", "rollout", "losses", "models", "training", "eval"},
}
FORBIDDEN_MODULES = {
    "rewards": {"torch", "megatron"},
    "data": {"megatron"},
    "rollout": {"megatron"},
    "losses": {"megatron"},
    "eval": {"megatron"},
}

PROBE = """
import importlib, json, pkgutil, sys
pkg = importlib.import_module("megatron_hpt." + sys.argv[1])
for info in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
    if info.name.endswith("__main__"):
        continue
    importlib.import_module(info.name)
print(json.dumps(sorted(sys.modules)))
"""


def stage_packages() -> set[str]:
    return {m.name for m in pkgutil.iter_modules(megatron_hpt.__path__) if m.ispkg}


def test_every_package_has_a_place():
    assert stage_packages() == set(ALLOWED) | FOUNDATIONS


@pytest.mark.parametrize("stage", sorted(ALLOWED))
def test_stage_loads_nothing_to_its_right(stage):
    out = subprocess.run([sys.executable, "-c", PROBE, stage], capture_output=True, text=True, check=True)
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    packages = {m.split(".")[1] for m in loaded if m.startswith("megatron_hpt.") and m.count(".") >= 1}
    packages &= stage_packages()
    extra = packages - ALLOWED[stage] - FOUNDATIONS - {stage}
    assert not extra, f"importing megatron_hpt.{stage} loads {sorted(extra)}"
    for top in FORBIDDEN_MODULES.get(stage, ()):
        assert top not in {m.split(".")[0] for m in loaded}, f"megatron_hpt.{stage} imports {top}"
