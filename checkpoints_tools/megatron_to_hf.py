"""megatron-core dist checkpoint -> HF checkpoint (safetensors), verified.

    python -m checkpoints_tools.megatron_to_hf CKPT_DIR OUT_DIR [--hf-config-dir DIR]
        [--dtype bf16] [--max-shard-size 5GB] [--no-verify] [--verify-tp 1] [--verify-pp 1]
        [--atol 1e-4] [--rtol 1e-4] [--overwrite]

Reads any checkpoint whose model follows the Qwen2/Llama map, whatever TP/PP
wrote it (a conversion, ``reshard``, or the trainer's ``save_model_checkpoint``;
optimizer state in it is ignored). Writes ``model.safetensors`` or, past
``--max-shard-size``, ``model-0000k-of-0000n.safetensors`` with
``model.safetensors.index.json``, plus the config, generation config and
tokenizer files stored in the checkpoint's ``hf/`` (or ``--hf-config-dir``).

Memory: one role of all layers at a time (fc1, the largest, is about half the
model), written tensor by tensor. Verification compares the written HF model
against the checkpoint loaded at ``--verify-tp/--verify-pp``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from checkpoints_tools.verify import DEFAULT_ATOL, DEFAULT_RTOL, add_verification_options, run_tool


def convert_megatron_to_hf(
    ckpt_dir: str | Path,
    out_dir: str | Path,
    *,
    hf_config_dir: str | Path | None = None,
    dtype: str | None = None,
    max_shard_size: str | int = "5GB",
    verify: bool = True,
    verify_tp: int = 1,
    verify_pp: int = 1,
    atol: float = DEFAULT_ATOL,
    rtol: float = DEFAULT_RTOL,
    overwrite: bool = False,
    log=print,
) -> dict:
    """Convert the dist checkpoint ``ckpt_dir`` into an HF directory ``out_dir``."""
    from megatron_hpt.models import load_hf_config
    from megatron_hpt.models.builder import check_parallel_layout
    from megatron_hpt.models.checkpoint import atomic_dir, checkpoint_hf_dir
    from megatron_hpt.models.checkpoint_format import CheckpointLayout, FullLayoutReader, checkpoint_bytes
    from megatron_hpt.models.hf_checkpoint import (
        SafetensorsShardWriter,
        TensorPlan,
        copy_aux_files,
        dtype_name,
        parse_dtype,
        parse_size,
    )
    from megatron_hpt.models.weights import hf_names_by_role, megatron_roles_to_hf

    start = time.perf_counter()
    ckpt_dir, out_dir = Path(ckpt_dir), Path(out_dir)
    config_dir = Path(hf_config_dir) if hf_config_dir else checkpoint_hf_dir(ckpt_dir)
    hf = load_hf_config(config_dir)
    if verify:
        check_parallel_layout(hf, verify_tp, verify_pp)
    layout = CheckpointLayout.from_hf(hf)
    reader = FullLayoutReader(ckpt_dir, layout)  # checks every tensor's presence and shape first
    cast = parse_dtype(dtype)
    shapes = _hf_shapes(hf)
    plan = [
        TensorPlan(name, shapes[name], cast or reader.dtype(role))
        for role, _layer, name in hf_names_by_role(hf)
    ]
    with atomic_dir(out_dir, overwrite=overwrite, what=f"the HF checkpoint {out_dir}") as tmp:
        writer = SafetensorsShardWriter(tmp, plan, parse_size(max_shard_size))
        for name, tensor in megatron_roles_to_hf(hf, reader.read_role):
            writer.write(name, tensor)
        files = writer.close()
        copy_aux_files(config_dir, tmp)
        out_dtype = {p.dtype for p in plan}
        _finish_config(tmp, hf, dtype_name(out_dtype.pop()) if len(out_dtype) == 1 else None)
        convert_s = time.perf_counter() - start
        log(f"wrote {out_dir} ({len(files)} safetensors file(s), {checkpoint_bytes(tmp) / 2**20:.1f} MiB) "
            f"in {convert_s:.1f} s")
        report = None
        if verify:
            from checkpoints_tools.verify import verify_checkpoint

            report = verify_checkpoint(
                ckpt_dir, tmp, tp=verify_tp, pp=verify_pp, hf_dir=config_dir, atol=atol, rtol=rtol,
                round_megatron_to=cast, log=log,
            )
    return {
        "out_dir": str(out_dir),
        "files": files,
        "convert_seconds": convert_s,
        "total_seconds": time.perf_counter() - start,
        "hf_bytes": checkpoint_bytes(out_dir),
        "verification": report.to_dict() if report else None,
    }


def _hf_shapes(hf) -> dict[str, tuple[int, ...]]:
    from megatron_hpt.models.architectures import hf_expected_shapes

    return {name: exp.shape for name, exp in hf_expected_shapes(hf).items()}


def _finish_config(out: Path, hf, dtype: str | None) -> None:
    """Record the weights' dtype in config.json; add generation_config.json if absent."""
    config_path = out / "config.json"
    config = json.loads(config_path.read_text())
    if dtype is not None:
        config["dtype"] = dtype
        if "torch_dtype" in config:
            config["torch_dtype"] = dtype
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    if not (out / "generation_config.json").is_file():
        from transformers import GenerationConfig

        GenerationConfig.from_model_config(hf).save_pretrained(str(out))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m checkpoints_tools.megatron_to_hf",
        description="Convert a megatron-core dist checkpoint (any TP/PP) into an HF safetensors checkpoint.",
    )
    p.add_argument("ckpt_dir", help="dist checkpoint directory (from hf_to_megatron, reshard or the trainer)")
    p.add_argument("out_dir", help="output HF directory (must not exist unless --overwrite)")
    p.add_argument("--hf-config-dir", default=None,
                   help="HF directory with config/tokenizer (default: the checkpoint's own hf/)")
    p.add_argument("--dtype", default=None, help="cast weights to fp32/bf16/fp16 (default: the checkpoint's dtype)")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors file (default 5GB)")
    p.add_argument("--verify-tp", type=int, default=1, help="TP size to load the checkpoint at for verification")
    p.add_argument("--verify-pp", type=int, default=1, help="PP size to load the checkpoint at for verification")
    add_verification_options(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_tool(
        convert_megatron_to_hf, ckpt_dir=args.ckpt_dir, out_dir=args.out_dir, hf_config_dir=args.hf_config_dir,
        dtype=args.dtype, max_shard_size=args.max_shard_size, verify=not args.no_verify, verify_tp=args.verify_tp,
        verify_pp=args.verify_pp, atol=args.atol, rtol=args.rtol, overwrite=args.overwrite,
    )


if __name__ == "__main__":
    sys.exit(main())
