"""Checkpoint conversions, each verified: HF (safetensors) -> megatron-core dist
checkpoint, dist checkpoint -> HF, and a dist checkpoint rewritten for another TP/PP.

Every conversion is the same sequence (``_convert``): write the output into
``OUT.tmp``, record what it is, compare its logits with HF transformers
(``verification``; skipped with ``verify=False``), record the verdict, then fsync
and rename ``OUT.tmp`` to ``OUT``. Any error on the way (a bad input, a full disk,
logits past the tolerance) removes ``OUT.tmp`` and leaves no ``OUT``; a write the
storage refuses raises ``CheckpointWriteError`` naming the file and the OS error.
Each returns a report dict (output, seconds, bytes, verification).

Dist checkpoints are layout independent (``checkpoint_format``): a conversion
writes one at the full layout, in this process, and it loads at any TP/PP that
divides the model; the ``tp``/``pp`` a conversion takes name the layout to check
up front (an error names the field they do not divide) and to verify at (TP x PP
local processes).

Memory: HF tensors are memory-mapped and handed to the dist-checkpoint writer as
they are (only the fused QKV is a new tensor), so HF -> Megatron holds about one
copy of the weights, most of it as file pages; Megatron -> HF reads one role of all
layers at a time (fc1, the largest, is about half the model) and writes tensor by
tensor; a reshard holds one copy (the dist-checkpoint save takes the whole state at
once). Measured by ``benchmarks/conversion_memory.py``. Verification loads the HF
model and then the Megatron model in fp32, one after the other.

The command lines over these functions are in ``conversion_cli``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from megatron_hpt.models.architectures import arch_for, hf_expected_shapes
from megatron_hpt.models.builder import check_parallel_layout, load_hf_config
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
from megatron_hpt.models.hf_checkpoint import (
    HFCheckpointReader,
    SafetensorsShardWriter,
    TensorPlan,
    copy_aux_files,
    dtype_name,
    parse_dtype,
    parse_size,
)
from megatron_hpt.models.verification import (
    DEFAULT_ATOL,
    DEFAULT_RTOL,
    LogitsReport,
    hf_model_from_checkpoint,
    verify_checkpoint,
)
from megatron_hpt.models.weights import hf_names_by_role, hf_to_roles, megatron_roles_to_hf


@dataclass(frozen=True)
class _Options:
    """What every conversion is told besides its inputs."""

    verify: bool
    atol: float
    rtol: float
    overwrite: bool
    log: Callable[[str], object]


@dataclass(frozen=True)
class _Written:
    summary: str
    """What the "wrote OUT (...)" line says about the output."""
    fields: dict
    """Entries of the conversion's report."""


def _convert(
    out_dir: Path,
    what: str,
    opts: _Options,
    write: Callable[[Path], _Written],
    verify: Callable[[Path], LogitsReport],
    *,
    bytes_key: str,
) -> dict:
    """The sequence every conversion shares: ``write`` into ``OUT.tmp``, log it,
    ``verify`` it (unless told not to), rename it into place; an error anywhere
    removes ``OUT.tmp`` (``atomic_dir``). Returns the report."""
    start = time.perf_counter()
    with atomic_dir(out_dir, overwrite=opts.overwrite, what=what) as tmp:
        written = write(tmp)
        convert_s = time.perf_counter() - start
        opts.log(f"wrote {out_dir} ({written.summary}) in {convert_s:.1f} s")
        report = verify(tmp) if opts.verify else None
    return {
        "out_dir": str(out_dir),
        **written.fields,
        "convert_seconds": convert_s,
        "total_seconds": time.perf_counter() - start,
        bytes_key: checkpoint_bytes(out_dir),
        "verification": report.to_dict() if report else None,
    }


def _save_full_layout(ckpt_dir: Path, layout: CheckpointLayout, tensors: Iterator[tuple]) -> None:
    """Write ``(role, layer, tensor)`` entries as a dist checkpoint at the full layout
    (the writer, holding every tensor, is freed on return)."""
    writer = FullLayoutWriter(layout)
    for role, layer, tensor in tensors:
        writer.add(role, layer, tensor)
    writer.save(ckpt_dir)


def _open_checkpoint(ckpt_dir: Path, hf_config_dir, layout_to_check: tuple[int, int] | None):
    """A dist checkpoint to convert: (the directory of its HF config and tokenizer -- its own
    ``hf/`` unless ``hf_config_dir`` is given --, the HF config, a reader). The TP x PP
    ``layout_to_check`` must divide the model; the reader checks every tensor's presence and
    shape up front."""
    config_dir = Path(hf_config_dir) if hf_config_dir else checkpoint_hf_dir(ckpt_dir)
    hf = load_hf_config(config_dir)
    if layout_to_check is not None:
        check_parallel_layout(hf, *layout_to_check)
    return config_dir, hf, FullLayoutReader(ckpt_dir, CheckpointLayout.from_hf(hf))


def _to_megatron(
    out_dir: Path,
    what: str,
    opts: _Options,
    write_weights: Callable[[Path], dict],
    *,
    tool: str,
    hf_dir: Path,
    source: dict,
    tp: int,
    pp: int,
    reference,
    against: str,
    cast,
) -> dict:
    """A conversion whose output is a dist checkpoint: ``write_weights(tmp)`` writes
    the weights (and returns more metadata fields), then the metadata and ``hf/`` are
    written, and verification against ``reference`` (see ``verify_checkpoint``) at
    ``tp`` x ``pp`` is recorded in them."""

    def write(tmp: Path) -> _Written:
        fields = write_weights(tmp)
        meta = write_checkpoint_metadata(
            tmp,
            hf_dir=hf_dir,
            written_at={
                "tensor_model_parallel_size": 1,
                "pipeline_model_parallel_size": 1,
                # the tool's name, as every checkpoint written so far records it
                "writer": f"checkpoints_tools.{tool} (full layout, one process)",
            },
            source=source,
            target_layout={"tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp},
            **fields,
            verification=None,
        )
        return _Written(f"{checkpoint_bytes(tmp) / 2**20:.1f} MiB, {meta['dtype']}", {"dtype": meta["dtype"], **fields})

    def verify(tmp: Path) -> LogitsReport:
        report = verify_checkpoint(
            tmp, reference, tp=tp, pp=pp, atol=opts.atol, rtol=opts.rtol, round_reference_to=cast, log=opts.log
        )
        update_checkpoint_metadata(tmp, verification={"against": against, **report.to_dict()})
        return report

    return _convert(out_dir, what, opts, write, verify, bytes_key="checkpoint_bytes")


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
    """Convert ``hf_dir`` into a dist checkpoint at ``out_dir``, verified at ``tp`` x
    ``pp`` against the HF model; returns a report dict.

    ``dtype`` casts every tensor ("bf16", "fp32", ...); by default tensors keep
    the dtype they have in the safetensors files."""
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    hf = load_hf_config(hf_dir)
    arch_for(hf)
    check_parallel_layout(hf, tp, pp)
    cast = parse_dtype(dtype)
    layout = CheckpointLayout.from_hf(hf)

    def write_weights(tmp: Path) -> dict:
        with HFCheckpointReader(hf_dir, hf) as reader:
            unused = reader.check()
            if unused:
                log(f"note: {len(unused)} HF tensors are not part of the model map and are skipped: "
                    f"{', '.join(unused[:4])}{' ...' if len(unused) > 4 else ''}")
            get = reader.get if cast is None else (lambda name: reader.get(name).to(cast))
            _save_full_layout(tmp, layout, hf_to_roles(hf, get, split_fc1=True))
        return {"skipped_hf_tensors": unused}

    opts = _Options(verify=verify, atol=atol, rtol=rtol, overwrite=overwrite, log=log)
    return _to_megatron(
        out_dir, f"the Megatron checkpoint {out_dir}", opts, write_weights, tool="hf_to_megatron", hf_dir=hf_dir, source={"kind": "hf", "path": str(hf_dir.resolve())},
        tp=tp, pp=pp, reference=hf_dir, against=str(hf_dir.resolve()), cast=cast,
    )


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

    Model weights in a dist checkpoint are global tensors, so one written at any
    TP/PP already loads at any other; resharding checks that ``tp``/``pp`` divide
    the model, drops everything that is not model weights (the distributed
    optimizer's state is laid out per data-parallel rank and is not portable across
    layouts), optionally casts, records the new target layout, and verifies the
    result at ``tp`` x ``pp`` against HF transformers running the source's weights.
    ``hf_config_dir`` gives the HF config/tokenizer for checkpoints that do not
    carry their own ``hf/`` (the trainer's step checkpoints)."""
    src_dir, out_dir = Path(src_dir), Path(out_dir)
    try:
        src_written_at = read_checkpoint_metadata(src_dir).get("written_at")
    except FileNotFoundError:  # a checkpoint saved without our metadata (the trainer's)
        src_written_at = None
    config_dir, _hf, reader = _open_checkpoint(src_dir, hf_config_dir, (tp, pp))
    layout = reader.layout
    cast = parse_dtype(dtype)

    def weights() -> Iterator[tuple]:
        for role in layout.global_roles + layout.layer_roles:
            for layer, tensor in reader.read_role(role).items():
                if cast is not None:
                    tensor = tuple(t.to(cast) for t in tensor) if isinstance(tensor, tuple) else tensor.to(cast)
                yield role, layer, tensor

    def write_weights(tmp: Path) -> dict:
        _save_full_layout(tmp, layout, weights())
        return {}

    opts = _Options(verify=verify, atol=atol, rtol=rtol, overwrite=overwrite, log=log)
    return _to_megatron(
        out_dir, f"the resharded checkpoint {out_dir}", opts, write_weights, tool="reshard", hf_dir=config_dir,
        source={"kind": "megatron", "path": str(src_dir.resolve()), "written_at": src_written_at},
        tp=tp, pp=pp, reference=lambda: hf_model_from_checkpoint(src_dir, config_dir),
        against=f"HF model from {src_dir}", cast=cast,
    )


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
    """Convert the dist checkpoint ``ckpt_dir`` (any TP/PP wrote it: a conversion, a
    reshard or the trainer; optimizer state in it is ignored) into an HF directory
    ``out_dir``: ``model.safetensors`` or, past ``max_shard_size``,
    ``model-0000k-of-0000n.safetensors`` with ``model.safetensors.index.json``, plus
    the config, generation config and tokenizer files of the checkpoint's ``hf/`` (or
    ``hf_config_dir``). Verified by comparing the written HF model with the checkpoint
    loaded at ``verify_tp`` x ``verify_pp``."""
    ckpt_dir, out_dir = Path(ckpt_dir), Path(out_dir)
    config_dir, hf, reader = _open_checkpoint(ckpt_dir, hf_config_dir, (verify_tp, verify_pp) if verify else None)
    cast = parse_dtype(dtype)
    shard_bytes = parse_size(max_shard_size)
    shapes = {name: exp.shape for name, exp in hf_expected_shapes(hf).items()}
    plan = [TensorPlan(name, shapes[name], cast or reader.dtype(role)) for role, _layer, name in hf_names_by_role(hf)]

    def write(tmp: Path) -> _Written:
        writer = SafetensorsShardWriter(tmp, plan, shard_bytes)
        for name, tensor in megatron_roles_to_hf(hf, reader.read_role):
            writer.write(name, tensor)
        files = writer.close()
        copy_aux_files(config_dir, tmp)
        out_dtypes = {p.dtype for p in plan}
        _finish_config(tmp, hf, dtype_name(out_dtypes.pop()) if len(out_dtypes) == 1 else None)
        return _Written(f"{len(files)} safetensors file(s), {checkpoint_bytes(tmp) / 2**20:.1f} MiB", {"files": files})

    def check(tmp: Path) -> LogitsReport:
        return verify_checkpoint(ckpt_dir, tmp, tp=verify_tp, pp=verify_pp, hf_dir=config_dir, atol=atol, rtol=rtol,
                                 round_megatron_to=cast, log=log)

    opts = _Options(verify=verify, atol=atol, rtol=rtol, overwrite=overwrite, log=log)
    return _convert(out_dir, f"the HF checkpoint {out_dir}", opts, write, check, bytes_key="hf_bytes")


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
