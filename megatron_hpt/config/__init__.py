"""Typed configs: dataclasses built from YAML recipes and command-line overrides.

Every component owns a ``@dataclass(kw_only=True, frozen=True)`` config; this
package turns nested dicts into those dataclasses strictly (unknown keys and
wrong types are errors naming the key), resolves recipe inheritance
(``base:``), and holds the name registries that presets and architectures use.
"""

from megatron_hpt.config.loading import (
    ConfigError,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    load_recipe,
    recipe_path,
    dump_yaml,
)
from megatron_hpt.config.registry import Registry

__all__ = [
    "ConfigError",
    "Registry",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "dump_yaml",
    "load_recipe",
    "recipe_path",
]
