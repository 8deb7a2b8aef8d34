"""Create the small embedded default model (or a variant) as an HF checkpoint.

    python -m checkpoints_tools.make_tiny_model OUT_DIR [--architecture Qwen2ForCausalLM]
        [--tie-word-embeddings] [--llama3-rope-scaling] [--num-layers 4] [--hidden-size 128]
        [--num-heads 4] [--num-kv-heads 2] [--intermediate-size 384] [--vocab-size 512] [--seed 0]

Random init, a byte-level BPE tokenizer trained locally with single-digit
tokens and a ChatML chat template; nothing is downloaded (hubs are unreachable).
The default is the model the demo and the tests use (``megatron_hpt.models.tiny``).
"""

import sys

from megatron_hpt.models.conversion_cli import tool_main


def main(argv: list[str] | None = None) -> int:
    return tool_main("make-tiny-model", argv)


if __name__ == "__main__":
    sys.exit(main())
