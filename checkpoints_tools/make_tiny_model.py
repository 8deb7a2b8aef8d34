"""Create the small embedded default model (or a variant) as an HF checkpoint.

    python -m checkpoints_tools.make_tiny_model OUT_DIR [--architecture Qwen2ForCausalLM]
        [--tie-word-embeddings] [--llama3-rope-scaling] [--num-layers 4] [--hidden-size 128]
        [--num-heads 4] [--num-kv-heads 2] [--intermediate-size 384] [--vocab-size 512] [--seed 0]

Random init, a byte-level BPE tokenizer trained locally with single-digit
tokens and a ChatML chat template; nothing is downloaded (hubs are unreachable).
The default is the model the demo and the tests use.
"""

from __future__ import annotations

import argparse
import sys

LLAMA3_ROPE_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}
"""Llama-3.1's scaling with a short original context, so the tiny model's
positions exercise all three frequency bands."""


def build_parser() -> argparse.ArgumentParser:
    from megatron_hpt.models.tiny import TinyModelSpec

    d = TinyModelSpec()
    p = argparse.ArgumentParser(prog="python -m checkpoints_tools.make_tiny_model", description=__doc__.split("\n")[0])
    p.add_argument("out_dir", help="directory to write the HF checkpoint into")
    p.add_argument("--architecture", default=d.architecture, choices=["Qwen2ForCausalLM", "LlamaForCausalLM"])
    p.add_argument("--tie-word-embeddings", action="store_true", help="share the embedding and output weights")
    p.add_argument("--llama3-rope-scaling", action="store_true", help="Llama-3 rope scaling (Llama only)")
    p.add_argument("--num-layers", type=int, default=d.num_hidden_layers)
    p.add_argument("--hidden-size", type=int, default=d.hidden_size)
    p.add_argument("--num-heads", type=int, default=d.num_attention_heads)
    p.add_argument("--num-kv-heads", type=int, default=d.num_key_value_heads)
    p.add_argument("--intermediate-size", type=int, default=d.intermediate_size)
    p.add_argument("--vocab-size", type=int, default=d.vocab_size)
    p.add_argument("--seed", type=int, default=d.seed)
    return p


def main(argv: list[str] | None = None) -> int:
    from megatron_hpt.models.tiny import TinyModelSpec, create_tiny_model

    args = build_parser().parse_args(argv)
    if args.llama3_rope_scaling and args.architecture != "LlamaForCausalLM":
        print("error: --llama3-rope-scaling needs --architecture LlamaForCausalLM", file=sys.stderr)
        return 1
    spec = TinyModelSpec(
        architecture=args.architecture,
        tie_word_embeddings=args.tie_word_embeddings,
        rope_scaling=dict(LLAMA3_ROPE_SCALING) if args.llama3_rope_scaling else None,
        num_hidden_layers=args.num_layers,
        hidden_size=args.hidden_size,
        num_attention_heads=args.num_heads,
        num_key_value_heads=args.num_kv_heads,
        intermediate_size=args.intermediate_size,
        vocab_size=args.vocab_size,
        seed=args.seed,
    )
    out = create_tiny_model(args.out_dir, spec)
    print(f"wrote {out} ({spec.architecture}, {spec.num_hidden_layers} layers, hidden {spec.hidden_size})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
