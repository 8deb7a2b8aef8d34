"""Imports point one way (STYLE.md §1), checked two ways:

- statically, every import statement of every module (at module level and inside
  functions, where lazy imports hide) of the package, ``checkpoints_tools/`` and
  ``launchers/``: a stage imports only stages to its left and the foundations; the
  package never imports the tools, the launchers, the tests or the benchmarks; the
  tools may import the package; the launchers only the recipe loader
  (``megatron_hpt.config``, as their docstrings say);
- by importing, in a fresh interpreter, every module of a stage: it loads no stage
  to its right, and the leaf stages stay free of heavy dependencies (rewards: no
  torch; rollout: no megatron); the launchers' recipe helper loads no torch.

Both checkers also run on small synthetic trees with a backward stage edge and a
package-to-tools import, to show that they report them.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pytest

REPO = Path(__file__).resolve().parents[2]

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


@dataclass(frozen=True)
class Layering:
    """The import rules of a project tree."""

    package: str
    stages: dict[str, set[str]]
    """Stage -> the stages it may import (itself and the foundations implied)."""
    foundations: set[str]
    """Shared subpackages every stage may import; they import only each other."""
    tools: dict[str, set[str]] = field(default_factory=dict)
    """Folder beside the package -> the modules of the package it may import
    (the package's name: all of it); its own modules are always allowed."""
    never_imported: set[str] = field(default_factory=set)
    """Folders that no code of the package or the tools imports."""


PROJECT = Layering(
    package="megatron_hpt",
    stages=ALLOWED,
    foundations=FOUNDATIONS,
    tools={"checkpoints_tools": {"megatron_hpt"}, "launchers": {"megatron_hpt.config"}},
    never_imported={"tests", "benchmarks"},
)


@dataclass(frozen=True)
class Import:
    module: str
    """The importing module, e.g. ``megatron_hpt.rollout.engine``."""
    imported: str
    """What it imports, e.g. ``megatron_hpt.training.policy`` or ``torch``."""
    where: str
    """file:line."""


def _module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(module: str, is_package: bool, level: int, name: str | None) -> str:
    """The absolute name of ``from <level dots><name> import ...`` written in ``module``."""
    if level == 0:
        return name or ""
    base = module.split(".")
    base = base[: len(base) - level + (1 if is_package else 0)]
    return ".".join(base + ([name] if name else []))


def imports_of(root: Path, path: Path) -> Iterator[Import]:
    """Every import in one file: statements anywhere in it, and
    ``importlib.import_module("literal")`` calls."""
    module = _module_name(root, path)
    is_package = path.name == "__init__.py"
    rel = path.relative_to(root)
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        where = f"{rel}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(module, alias.name, where)
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, is_package, node.level, node.module)
            if "." in base:
                yield Import(module, base, where)
            else:  # `from pkg import stage`: what is imported is pkg.stage
                for alias in node.names:
                    yield Import(module, f"{base}.{alias.name}", where)
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            yield Import(module, node.args[0].value, where)


def _python_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.py") if "__pycache__" not in p.parts)


def layering_violations(root: Path, rules: Layering) -> list[str]:
    """Every import under ``root`` that breaks ``rules``, as 'file:line: what'."""
    pkg = rules.package
    top_modules = {p.stem for p in (root / pkg).glob("*.py") if p.stem != "__init__"}
    tool_modules = {tool: {tool} | {p.stem for p in _python_files(root / tool)} for tool in rules.tools}
    project = {pkg} | set(rules.tools) | rules.never_imported | set().union(*tool_modules.values())
    out = []

    def stage_of(name: str) -> str | None:
        parts = name.split(".")
        return parts[1] if parts[0] == pkg and len(parts) > 1 else None

    for imp in (i for p in _python_files(root / pkg) for i in imports_of(root, p)):
        top, here, there = imp.imported.split(".")[0], stage_of(imp.module), stage_of(imp.imported)
        if top in project and top != pkg:
            out.append(f"{imp.where}: {imp.module} imports {imp.imported} (the package never imports {top})")
        elif top != pkg or here is None or there is None or there == here:
            continue
        elif here in rules.foundations:
            if there in rules.stages or there in top_modules:
                out.append(f"{imp.where}: foundation {here} imports {imp.imported}")
        elif here in rules.stages:
            ok = rules.stages[here] | rules.foundations
            if there in rules.stages or there in top_modules or there in rules.foundations:
                if there not in ok:
                    out.append(f"{imp.where}: stage {here} imports {imp.imported} (it may import "
                               f"{', '.join(sorted(ok))})")
    for tool, allowed in rules.tools.items():
        own = tool_modules[tool]
        for imp in (i for p in _python_files(root / tool) for i in imports_of(root, p)):
            top = imp.imported.split(".")[0]
            if top not in project or top in own:
                continue
            if not any(imp.imported == a or imp.imported.startswith(a + ".") for a in allowed):
                out.append(f"{imp.where}: {tool} imports {imp.imported} (it may import {', '.join(sorted(allowed))})")
    return sorted(set(out))


# The probe imports every module of a stage in a fresh interpreter and prints sys.modules.
PROBE = """
import importlib, json, pkgutil, sys
sys.path.insert(0, sys.argv[1])
pkg = importlib.import_module(sys.argv[2])
for info in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
    if info.name.endswith("__main__"):
        continue
    importlib.import_module(info.name)
print(json.dumps(sorted(sys.modules)))
"""


def loaded_stages(root: Path, rules: Layering, stage: str) -> tuple[set[str], set[str]]:
    """(the package's stages, the top-level modules) loaded by importing every module of ``stage``."""
    out = subprocess.run([sys.executable, "-c", PROBE, str(root), f"{rules.package}.{stage}"],
                         capture_output=True, text=True, check=True, cwd=root)
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    known = set(rules.stages) | rules.foundations
    stages = {m.split(".")[1] for m in loaded if m.startswith(rules.package + ".")} & known
    return stages, {m.split(".")[0] for m in loaded}


def right_of(rules: Layering, stage: str, stages: set[str]) -> set[str]:
    return stages - rules.stages[stage] - rules.foundations - {stage}


# --------------------------------------------------------------------------- #
# The project
# --------------------------------------------------------------------------- #
def test_every_package_has_a_place():
    found = {p.name for p in (REPO / "megatron_hpt").iterdir() if (p / "__init__.py").is_file()}
    assert found == set(ALLOWED) | FOUNDATIONS


def test_no_import_points_the_wrong_way():
    assert layering_violations(REPO, PROJECT) == []


@pytest.mark.parametrize("stage", sorted(ALLOWED))
def test_stage_loads_nothing_to_its_right(stage):
    stages, tops = loaded_stages(REPO, PROJECT, stage)
    assert not right_of(PROJECT, stage, stages), f"importing megatron_hpt.{stage} loads {sorted(stages)}"
    for top in FORBIDDEN_MODULES.get(stage, ()):
        assert top not in tops, f"megatron_hpt.{stage} imports {top}"


def test_the_launchers_recipe_helper_loads_no_torch():
    """launchers/recipe_layout.py runs in the launch environment (no torch) and on login nodes."""
    probe = "import json, sys; sys.path.insert(0, 'launchers'); import recipe_layout; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=REPO)
    tops = {m.split(".")[0] for m in json.loads(out.stdout.strip().splitlines()[-1])}
    assert "megatron_hpt" in tops and not tops & {"torch", "megatron"}


# --------------------------------------------------------------------------- #
# The checkers on synthetic trees
# --------------------------------------------------------------------------- #
SYNTHETIC = Layering(
    package="pkg",
    stages={"data": set(), "rollout": {"data"}, "trainer": {"data", "rollout"}},
    foundations={"config"},
    tools={"tools": {"pkg"}, "launchers": {"pkg.config"}},
    never_imported={"tests"},
)
CLEAN_TREE = {
    "pkg/__init__.py": "",
    "pkg/cli.py": "def convert():\n    from pkg.trainer import loop\n",
    "pkg/config/__init__.py": "VALUE = 1\n",
    "pkg/data/__init__.py": "from pkg.config import VALUE\n",
    "pkg/rollout/__init__.py": "from pkg.data import VALUE\nfrom . import engine\n",
    "pkg/rollout/engine.py": "from ..data import VALUE\nimport json\n",
    "pkg/trainer/__init__.py": "",
    "pkg/trainer/loop.py": "from pkg import rollout\nfrom pkg.rollout.engine import VALUE\n",
    "tools/__init__.py": "",
    "tools/convert.py": "from pkg.trainer.loop import VALUE\nfrom tools import helper\n",
    "tools/helper.py": "",
    "launchers/layout.py": "import json\nfrom pkg.config import VALUE\n",
    "launchers/jobs.py": "import layout\n",
}


def _tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(textwrap.dedent(text))
    return root


def test_a_clean_synthetic_tree_has_no_violations(tmp_path):
    root = _tree(tmp_path, CLEAN_TREE)
    assert layering_violations(root, SYNTHETIC) == []
    for stage in SYNTHETIC.stages:
        assert not right_of(SYNTHETIC, stage, loaded_stages(root, SYNTHETIC, stage)[0])


def test_a_lazy_package_to_tools_import_is_reported(tmp_path):
    """The import the package had (trainer/demo.py, cli.py): inside a function, so importing
    the module alone never runs it; the static checker reports it wherever it is."""
    root = _tree(tmp_path, {
        **CLEAN_TREE,
        "pkg/trainer/demo.py": """
            def run_demo():
                from tools.convert import VALUE
                return VALUE
        """,
        "pkg/cli.py": "import importlib\n\ndef convert():\n    return importlib.import_module('tools.convert')\n",
        "pkg/data/fixtures.py": "def rows():\n    import tests.helpers\n",
    })
    assert layering_violations(root, SYNTHETIC) == [
        "pkg/cli.py:4: pkg.cli imports tools.convert (the package never imports tools)",
        "pkg/data/fixtures.py:2: pkg.data.fixtures imports tests.helpers (the package never imports tests)",
        "pkg/trainer/demo.py:3: pkg.trainer.demo imports tools.convert (the package never imports tools)",
    ]


def test_a_backward_stage_edge_is_reported_by_both_checkers(tmp_path):
    root = _tree(tmp_path, {
        **CLEAN_TREE,
        "pkg/data/types.py": "from pkg.rollout.engine import VALUE\n",  # data -> rollout: backward
        "pkg/rollout/sync.py": "def push():\n    from ..trainer import loop\n",  # relative, lazy
        "pkg/config/defaults.py": "from pkg.data import VALUE\n",  # a foundation importing a stage
        "pkg/rollout/cli_hook.py": "def main():\n    from pkg import cli\n",  # a stage importing the top
    })
    assert layering_violations(root, SYNTHETIC) == [
        "pkg/config/defaults.py:1: foundation config imports pkg.data",
        "pkg/data/types.py:1: stage data imports pkg.rollout.engine (it may import config)",
        "pkg/rollout/cli_hook.py:2: stage rollout imports pkg.cli (it may import config, data)",
        "pkg/rollout/sync.py:2: stage rollout imports pkg.trainer (it may import config, data)",
    ]
    stages, _ = loaded_stages(root, SYNTHETIC, "data")
    assert right_of(SYNTHETIC, "data", stages) == {"rollout"}


def test_tools_and_launchers_import_only_what_they_may(tmp_path):
    root = _tree(tmp_path, {
        **CLEAN_TREE,
        "launchers/jobs.py": "import layout\nfrom pkg.trainer import loop\n",
        "launchers/convert_job.py": "from tools import convert\n",
        "tools/bench.py": "import tests.helpers\n",
    })
    assert layering_violations(root, SYNTHETIC) == [
        "launchers/convert_job.py:1: launchers imports tools.convert (it may import pkg.config)",
        "launchers/jobs.py:2: launchers imports pkg.trainer (it may import pkg.config)",
        "tools/bench.py:1: tools imports tests.helpers (it may import pkg)",
    ]
