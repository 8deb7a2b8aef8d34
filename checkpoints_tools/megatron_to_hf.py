"""megatron-core dist checkpoint -> HF checkpoint (safetensors), verified.

    python -m checkpoints_tools.megatron_to_hf CKPT_DIR OUT_DIR [--hf-config-dir DIR]
        [--dtype bf16] [--max-shard-size 5GB] [--no-verify] [--verify-tp 1] [--verify-pp 1]
        [--atol 1e-4] [--rtol 1e-4] [--overwrite]

Reads a checkpoint written at any TP/PP (a conversion, ``reshard``, or the
trainer's; optimizer state in it is ignored). See
``megatron_hpt.models.conversion.convert_megatron_to_hf``.
"""

import sys

from megatron_hpt.models.conversion_cli import tool_main


def main(argv: list[str] | None = None) -> int:
    return tool_main("megatron-to-hf", argv)


if __name__ == "__main__":
    sys.exit(main())
