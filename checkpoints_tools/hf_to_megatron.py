"""HF checkpoint (safetensors) -> megatron-core dist checkpoint, verified.

    python -m checkpoints_tools.hf_to_megatron HF_DIR OUT_DIR [--tp 2] [--pp 2]
        [--dtype bf16] [--no-verify] [--atol 1e-4] [--rtol 1e-4] [--overwrite]

The output is layout independent (see ``megatron_hpt.models.checkpoint_format``):
it is written once, at the full layout, by this process, and loads at any TP/PP
that divides the model. ``--tp/--pp`` name the layout you will train at: it is
checked against the config up front (an error names the field TP or PP does
not divide) and the logit verification loads the checkpoint at exactly that
layout, on TP x PP local processes.

Memory: the HF tensors are memory-mapped and handed to the writer as they are
(only the fused QKV is a new tensor), so the process holds about one copy of
the weights, most of it as file pages, plus one layer; measured by
``benchmarks/conversion_memory.py``. Verification loads the HF model and then
the Megatron model in fp32, one after the other; skip it with ``--no-verify``
on machines that cannot hold an fp32 copy.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from checkpoints_tools.verify import DEFAULT_ATOL, DEFAULT_RTOL, add_verification_options, run_tool


def convert_hf_to_megatron(
    hf_dir: str | Path,
    out_dir: str | Path,
    *,
    tp: int = 1,
    pp: int = 1,
    dtype: str | None = None,
    verify: bool = True,
    atol: float = DEFAULT_ATOL,
    rtol: float = DEFAULT_RTOL,
    overwrite: bool = False,
    log=print,
) -> dict:
    """Convert ``hf_dir`` into a dist checkpoint at ``out_dir``; returns a report dict.

    ``dtype`` casts every tensor ("bf16", "fp32", ...); by default tensors keep
    the dtype they have in the safetensors files."""
    from megatron_hpt.models import arch_for, load_hf_config
    from megatron_hpt.models.builder import check_parallel_layout
    from megatron_hpt.models.checkpoint import atomic_dir, update_checkpoint_metadata, write_checkpoint_metadata
    from megatron_hpt.models.checkpoint_format import CheckpointLayout, FullLayoutWriter, checkpoint_bytes
    from megatron_hpt.models.hf_checkpoint import HFCheckpointReader, parse_dtype
    from megatron_hpt.models.weights import hf_to_roles

    start = time.perf_counter()
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    hf = load_hf_config(hf_dir)
    arch_for(hf)
    check_parallel_layout(hf, tp, pp)
    cast = parse_dtype(dtype)
    layout = CheckpointLayout.from_hf(hf)
    with atomic_dir(out_dir, overwrite=overwrite, what=f"the Megatron checkpoint {out_dir}") as tmp:
        with HFCheckpointReader(hf_dir, hf) as reader:
            unused = reader.check()
            if unused:
                log(f"note: {len(unused)} HF tensors are not part of the model map and are skipped: "
                    f"{', '.join(unused[:4])}{' ...' if len(unused) > 4 else ''}")
            get = reader.get if cast is None else (lambda name: reader.get(name).to(cast))
            writer = FullLayoutWriter(layout)
            for role, layer, tensor in hf_to_roles(hf, get, split_fc1=True):
                writer.add(role, layer, tensor)
            writer.save(tmp)
            del writer
        meta = write_checkpoint_metadata(
            tmp,
            hf_dir=hf_dir,
            written_at={
                "tensor_model_parallel_size": 1,
                "pipeline_model_parallel_size": 1,
                "writer": "checkpoints_tools.hf_to_megatron (full layout, one process)",
            },
            source={"kind": "hf", "path": str(hf_dir.resolve())},
            target_layout={"tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp},
            skipped_hf_tensors=unused,
            verification=None,
        )
        convert_s = time.perf_counter() - start
        log(f"wrote {out_dir} ({checkpoint_bytes(tmp) / 2**20:.1f} MiB, {meta['dtype']}) in {convert_s:.1f} s")
        report = None
        if verify:
            from checkpoints_tools.verify import verify_checkpoint

            report = verify_checkpoint(
                tmp, hf_dir, tp=tp, pp=pp, hf_dir=tmp / "hf", atol=atol, rtol=rtol, round_reference_to=cast, log=log
            )
            update_checkpoint_metadata(tmp, verification={"against": str(hf_dir.resolve()), **report.to_dict()})
    return {
        "out_dir": str(out_dir),
        "convert_seconds": convert_s,
        "total_seconds": time.perf_counter() - start,
        "checkpoint_bytes": checkpoint_bytes(out_dir),
        "dtype": meta["dtype"],
        "skipped_hf_tensors": unused,
        "verification": report.to_dict() if report else None,
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m checkpoints_tools.hf_to_megatron",
        description="Convert an HF Qwen2/Llama checkpoint into a megatron-core dist checkpoint and verify its logits.",
    )
    p.add_argument("hf_dir", help="local HF checkpoint directory (config.json + safetensors)")
    p.add_argument("out_dir", help="output dist checkpoint directory (must not exist unless --overwrite)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size to check and verify at (default 1)")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size to check and verify at (default 1)")
    p.add_argument("--dtype", default=None, help="cast weights to fp32/bf16/fp16 (default: keep the file's dtype)")
    add_verification_options(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_tool(
        convert_hf_to_megatron, hf_dir=args.hf_dir, out_dir=args.out_dir, tp=args.tp, pp=args.pp, dtype=args.dtype,
        verify=not args.no_verify, atol=args.atol, rtol=args.rtol, overwrite=args.overwrite,
    )


if __name__ == "__main__":
    sys.exit(main())
