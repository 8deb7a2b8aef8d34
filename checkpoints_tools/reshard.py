"""Megatron dist checkpoint at one TP/PP -> model checkpoint for another TP/PP, verified.

    python -m checkpoints_tools.reshard SRC_DIR OUT_DIR --tp 1 --pp 2 [--hf-config-dir DIR]
        [--dtype bf16] [--no-verify] [--atol 1e-4] [--rtol 1e-4] [--overwrite]

Keeps the model weights only (optimizer state is not portable across layouts). See
``megatron_hpt.models.conversion.reshard_checkpoint``.
"""

import sys

from megatron_hpt.models.conversion_cli import tool_main


def main(argv: list[str] | None = None) -> int:
    return tool_main("reshard", argv)


if __name__ == "__main__":
    sys.exit(main())
