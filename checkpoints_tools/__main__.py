"""`megatron-hpt convert <tool> ...` / `python -m checkpoints_tools <tool> ...`: one entry
point for the conversion tools (each also runs as its own module)."""

from __future__ import annotations

import importlib
import sys

TOOLS = {
    "hf-to-megatron": "checkpoints_tools.hf_to_megatron",
    "megatron-to-hf": "checkpoints_tools.megatron_to_hf",
    "reshard": "checkpoints_tools.reshard",
    "make-tiny-model": "checkpoints_tools.make_tiny_model",
    "import-smollm2": "checkpoints_tools.import_smollm2",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in TOOLS:
        known = "\n".join(f"  {name:16s} python -m {mod}" for name, mod in TOOLS.items())
        print(f"usage: megatron-hpt convert <tool> [args]   (tool --help for its arguments)\ntools:\n{known}")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    return importlib.import_module(TOOLS[argv[0]]).main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
