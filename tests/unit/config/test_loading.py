"""Strict config loading: recipes with bases, overrides, and errors that name the key."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest

from megatron_hpt.config import (
    ConfigError,
    Registry,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    load_recipe,
)


@dataclass(kw_only=True, frozen=True)
class Inner:
    lr: float = 1e-6
    mode: Literal["a", "b"] = "a"


@dataclass(kw_only=True, frozen=True)
class Root:
    name: str = "run"
    steps: int = 10
    inner: Inner = field(default_factory=Inner)
    tags: tuple[str, ...] = ()
    gate: int | None = None

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")


def test_nested_build_and_round_trip():
    cfg = config_from_dict(Root, {"steps": 3, "inner": {"lr": "5e-6", "mode": "b"}, "tags": ["x"]})
    assert cfg.steps == 3 and cfg.inner.lr == 5e-6 and cfg.inner.mode == "b" and cfg.tags == ("x",)
    assert config_from_dict(Root, config_to_dict(cfg)) == cfg


@pytest.mark.parametrize(
    "data,needle",
    [
        ({"stepz": 3}, "unknown key stepz"),
        ({"inner": {"lrr": 1}}, "unknown key inner.lrr"),
        ({"steps": "many"}, "steps: expected an integer"),
        ({"inner": {"mode": "c"}}, "inner.mode: 'c' is not one of"),
        ({"steps": 0}, "steps must be >= 1"),
        ({"gate": "x"}, "gate"),
    ],
)
def test_errors_name_the_key(data, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(")):
        config_from_dict(Root, data)


def test_recipe_base_chain_and_overrides(tmp_path):
    (tmp_path / "base.yaml").write_text("steps: 5\ninner:\n  lr: 1.0e-5\n  mode: b\n")
    (tmp_path / "child.yaml").write_text("base: base.yaml\ninner:\n  lr: 2.0e-5\n")
    data = load_recipe(tmp_path / "child.yaml")
    assert data == {"steps": 5, "inner": {"lr": 2.0e-5, "mode": "b"}}
    data = apply_overrides(data, ["steps=7", "inner.mode=a", "tags=[p, q]"])
    cfg = config_from_dict(Root, data)
    assert (cfg.steps, cfg.inner.lr, cfg.inner.mode, cfg.tags) == (7, 2.0e-5, "a", ("p", "q"))


def test_recipe_errors(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_recipe(tmp_path / "a.yaml")
    with pytest.raises(ConfigError, match="not found"):
        load_recipe(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="key.path=value"):
        apply_overrides({}, ["novalue"])


def test_registry_rejects_duplicates_and_lists_known():
    reg: Registry[int] = Registry("preset")
    reg.add("a", 1)

    @reg.register("b")
    def _b():
        return 2

    with pytest.raises(ValueError, match="already registered"):
        reg.add("a", 3)
    with pytest.raises(KeyError, match="known: a, b"):
        reg.get("c")
    assert reg.names() == ["a", "b"] and "a" in reg
