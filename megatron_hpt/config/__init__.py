"""Typed configs: dataclasses built from YAML recipes and command-line overrides.

Every component owns a ``@dataclass(kw_only=True, frozen=True)`` config; this
package turns nested dicts into those dataclasses strictly (unknown keys and
wrong types are errors naming the key), resolves recipe inheritance
(``base:``), holds the field checks configs run in ``__post_init__``
(``checks``), the errors commands report without a traceback (``errors``), and
the name registries that presets and architectures use.
"""

from megatron_hpt.config import checks
from megatron_hpt.config.errors import ConfigError, InputError, InputNotFoundError, ReportedError
from megatron_hpt.config.loading import (
    apply_overrides,
    config_from_dict,
    config_to_dict,
    dump_yaml,
    load_recipe,
    recipe_path,
)
from megatron_hpt.config.registry import Registry

__all__ = [
    "ConfigError",
    "InputError",
    "InputNotFoundError",
    "Registry",
    "ReportedError",
    "apply_overrides",
    "checks",
    "config_from_dict",
    "config_to_dict",
    "dump_yaml",
    "load_recipe",
    "recipe_path",
]
