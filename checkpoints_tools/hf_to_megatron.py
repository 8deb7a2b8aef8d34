"""HF checkpoint (safetensors) -> megatron-core dist checkpoint, verified.

    python -m checkpoints_tools.hf_to_megatron HF_DIR OUT_DIR [--tp 2] [--pp 2]
        [--dtype bf16] [--no-verify] [--atol 1e-4] [--rtol 1e-4] [--overwrite]

``--tp/--pp`` name the layout you will train at: checked against the config up
front and used for the logit verification (TP x PP local processes). Skip the
verification with ``--no-verify`` on machines that cannot hold an fp32 copy of the
model. See ``megatron_hpt.models.conversion.convert_hf_to_megatron``.
"""

import sys

from megatron_hpt.models.conversion_cli import tool_main


def main(argv: list[str] | None = None) -> int:
    return tool_main("hf-to-megatron", argv)


if __name__ == "__main__":
    sys.exit(main())
