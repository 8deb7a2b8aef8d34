"""Megatron dist checkpoint at one TP/PP -> model checkpoint for another TP/PP.

    python -m checkpoints_tools.reshard SRC_DIR OUT_DIR --tp 1 --pp 2 [--hf-config-dir DIR]
        [--dtype bf16] [--no-verify] [--atol 1e-4] [--rtol 1e-4] [--overwrite]

What is true of the format decides what this does. Model weights in a
megatron-core dist checkpoint are stored as global tensors, so a checkpoint
written at any TP/PP already loads at any other (the tests load one written by
TP=2 ranks at TP=1, PP=2). Resharding therefore rewrites the *model weights*
at the full layout: it checks that ``--tp/--pp`` divide the model, drops
everything that is not model weights (optimizer state, counters: the
distributed optimizer's state is laid out per data-parallel rank and is not
portable across layouts), optionally casts the dtype, records the new target
layout, and verifies the result by loading it at ``--tp/--pp`` and comparing
logits with HF transformers running the source checkpoint's weights.

Memory: one copy of the weights (the dist-checkpoint save takes the whole
state at once), read role by role.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from checkpoints_tools.verify import DEFAULT_ATOL, DEFAULT_RTOL, add_verification_options, run_tool


def reshard_checkpoint(
    src_dir: str | Path,
    out_dir: str | Path,
    *,
    tp: int,
    pp: int,
    hf_config_dir: str | Path | None = None,
    dtype: str | None = None,
    verify: bool = True,
    atol: float = DEFAULT_ATOL,
    rtol: float = DEFAULT_RTOL,
    overwrite: bool = False,
    log=print,
) -> dict:
    """Rewrite the model weights of ``src_dir`` into ``out_dir`` for a TP x PP layout.

    ``hf_config_dir`` gives the HF config/tokenizer for checkpoints that do not
    carry their own ``hf/`` (the trainer's step checkpoints)."""
    from megatron_hpt.models import load_hf_config
    from megatron_hpt.models.builder import check_parallel_layout
    from megatron_hpt.models.checkpoint import (
        atomic_dir,
        checkpoint_hf_dir,
        read_checkpoint_metadata,
        update_checkpoint_metadata,
        write_checkpoint_metadata,
    )
    from megatron_hpt.models.checkpoint_format import (
        CheckpointLayout,
        FullLayoutReader,
        FullLayoutWriter,
        checkpoint_bytes,
    )
    from megatron_hpt.models.hf_checkpoint import parse_dtype

    start = time.perf_counter()
    src_dir, out_dir = Path(src_dir), Path(out_dir)
    try:
        src_written_at = read_checkpoint_metadata(src_dir).get("written_at")
    except FileNotFoundError:  # a checkpoint saved without our metadata (the trainer's)
        src_written_at = None
    config_dir = Path(hf_config_dir) if hf_config_dir else checkpoint_hf_dir(src_dir)
    hf = load_hf_config(config_dir)
    check_parallel_layout(hf, tp, pp)
    layout = CheckpointLayout.from_hf(hf)
    reader = FullLayoutReader(src_dir, layout)
    cast = parse_dtype(dtype)
    with atomic_dir(out_dir, overwrite=overwrite, what=f"the resharded checkpoint {out_dir}") as tmp:
        writer = FullLayoutWriter(layout)
        for role in layout.global_roles + layout.layer_roles:
            for layer, tensor in reader.read_role(role).items():
                if cast is not None:
                    tensor = tuple(t.to(cast) for t in tensor) if isinstance(tensor, tuple) else tensor.to(cast)
                writer.add(role, layer, tensor)
        writer.save(tmp)
        del writer
        write_checkpoint_metadata(
            tmp,
            hf_dir=config_dir,
            written_at={
                "tensor_model_parallel_size": 1,
                "pipeline_model_parallel_size": 1,
                "writer": "checkpoints_tools.reshard (full layout, one process)",
            },
            source={"kind": "megatron", "path": str(src_dir.resolve()), "written_at": src_written_at},
            target_layout={"tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp},
            verification=None,
        )
        convert_s = time.perf_counter() - start
        log(f"wrote {out_dir} ({checkpoint_bytes(tmp) / 2**20:.1f} MiB) in {convert_s:.1f} s")
        report = None
        if verify:
            from checkpoints_tools.verify import hf_model_from_checkpoint, verify_checkpoint

            report = verify_checkpoint(
                tmp, lambda: hf_model_from_checkpoint(src_dir, config_dir), tp=tp, pp=pp,
                hf_dir=config_dir, atol=atol, rtol=rtol, round_reference_to=cast, log=log,
            )
            update_checkpoint_metadata(tmp, verification={"against": f"HF model from {src_dir}", **report.to_dict()})
    return {
        "out_dir": str(out_dir),
        "convert_seconds": convert_s,
        "total_seconds": time.perf_counter() - start,
        "checkpoint_bytes": checkpoint_bytes(out_dir),
        "verification": report.to_dict() if report else None,
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m checkpoints_tools.reshard",
        description="Rewrite a dist checkpoint's model weights for another TP/PP layout, verified.",
    )
    p.add_argument("src_dir", help="source dist checkpoint (any TP/PP wrote it)")
    p.add_argument("out_dir", help="output dist checkpoint (must not exist unless --overwrite)")
    p.add_argument("--tp", type=int, required=True, help="target tensor-parallel size")
    p.add_argument("--pp", type=int, required=True, help="target pipeline-parallel size")
    p.add_argument("--hf-config-dir", default=None,
                   help="HF directory with config/tokenizer (default: the checkpoint's own hf/)")
    p.add_argument("--dtype", default=None, help="cast weights to fp32/bf16/fp16 (default: keep)")
    add_verification_options(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_tool(
        reshard_checkpoint, src_dir=args.src_dir, out_dir=args.out_dir, tp=args.tp, pp=args.pp,
        hf_config_dir=args.hf_config_dir, dtype=args.dtype, verify=not args.no_verify,
        atol=args.atol, rtol=args.rtol, overwrite=args.overwrite,
    )


if __name__ == "__main__":
    sys.exit(main())
