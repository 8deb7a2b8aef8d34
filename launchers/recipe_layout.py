"""The trainer layout a recipe asks for, for the launchers: they know the world size
(nodes x ranks per node), the recipe knows tensor x pipeline parallel, and the trainer
needs ``data_parallel_size`` = world size / (TP x PP).

    python launchers/recipe_layout.py RECIPE WORLD_SIZE [dotted.key=value ...]
        prints the data_parallel_size override, or exits 2 naming what does not divide

Reads only the YAML (``megatron_hpt.config``: no torch), so it runs in the launch
environment and on login nodes alike.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a source checkout works too

from megatron_hpt.config import apply_overrides, load_recipe  # noqa: E402


def model_parallel_size(recipe: str, overrides: list[str]) -> int:
    """tensor_model_parallel_size x pipeline_model_parallel_size of the recipe (default 1 each)."""
    parallel = apply_overrides(load_recipe(recipe), list(overrides)).get("parallel") or {}
    return int(parallel.get("tensor_model_parallel_size", 1)) * int(parallel.get("pipeline_model_parallel_size", 1))


def data_parallel_override(recipe: str, world_size: int, overrides: list[str]) -> str:
    """``data_parallel_size=N`` for a run of ``world_size`` ranks."""
    mp = model_parallel_size(recipe, overrides)
    if world_size % mp:
        raise ValueError(
            f"{world_size} trainer ranks do not divide into tensor x pipeline parallel groups of {mp} "
            f"(recipe {recipe}): change the ranks per node or parallel.* in the recipe"
        )
    return f"data_parallel_size={world_size // mp}"


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    try:
        print(data_parallel_override(argv[0], int(argv[1]), argv[2:]))
    except (ValueError, FileNotFoundError) as err:
        print(f"recipe_layout: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
