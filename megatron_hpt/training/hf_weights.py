"""HF weights in and out of a live Megatron model: loading an HF checkpoint into this
rank's stage, and writing the live weights as HF safetensors (weight sync to the
rollout servers, the final export).

Every tensor-parallel group gathers its shards (one tensor at a time); each pipeline
stage of data-parallel rank 0 writes the HF tensors of its own layers to its own
safetensors file, and rank 0 writes the index, so export is parallel over stages
and never holds more than one stage's weights on a rank.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_hpt.models.architectures import (
    HF_EMBED,
    HF_FINAL_NORM,
    HF_LM_HEAD,
    arch_for,
    hf_layer_names,
    megatron_layer_to_hf,
)
from megatron_hpt.models.hf_checkpoint import HFCheckpointReader
from megatron_hpt.models.weights import (
    attention_shape,
    hf_to_full_layout,
    layer_offset,
    load_full_layout,
    local_to_global,
    model_tensors,
    role_of,
    tp_merge,
)
from megatron_hpt.parallel import ParallelState

_HF_SIDE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "vocab.json",
    "merges.txt",
)


@torch.no_grad()
def load_hf_weights(module, st: ParallelState, hf_config, hf_dir: str | Path) -> None:
    """Load an HF checkpoint into this rank's stage, keeping only this stage's tensors."""
    wanted = set()
    offset = layer_offset(module, st.pp_rank)
    for name in model_tensors(module):
        wanted.add(role_of(local_to_global(name, offset))[0])
    full = {}
    with HFCheckpointReader(hf_dir, hf_config) as source:
        source.check()
        for name, tensor in hf_to_full_layout(hf_config, source.get):
            if name in wanted or (name.startswith("embedding.") and "output_layer.weight" in wanted):
                full[name] = tensor.clone()
    load_full_layout(module, full.__getitem__, tp_rank=st.tp_rank, tp_size=st.tp_size, pp_rank=st.pp_rank)


@torch.no_grad()
def gather_stage_full_layout(module, st: ParallelState, tensors: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """This stage's tensors in the full layout (global names, TP shards merged): the
    weights, or ``tensors`` keyed like them (e.g. gradients). A collective over the
    tensor-parallel group."""
    offset = layer_offset(module, st.pp_rank)
    out = {}
    for name, t in (tensors if tensors is not None else model_tensors(module)).items():
        global_name, role = role_of(local_to_global(name, offset))
        t = t.detach()
        if st.tp_size > 1:
            shards = [torch.empty_like(t) for _ in range(st.tp_size)]
            dist.all_gather(shards, t.contiguous(), group=st.tp_group)
            t = tp_merge(shards, role)
        out[global_name] = t.to("cpu", copy=True)
    return out


def full_layout_stage_to_hf(full: dict[str, torch.Tensor], hf_config) -> dict[str, torch.Tensor]:
    """HF tensors of the layers (and embeddings/head) present in a stage's full-layout dict."""
    from megatron_hpt.models.architectures import MG_EMBED, MG_FINAL_NORM, MG_OUTPUT, mg_layer_names

    bias = arch_for(hf_config).qkv_bias(hf_config)
    shape = attention_shape(hf_config)
    tied = bool(getattr(hf_config, "tie_word_embeddings", False))
    out: dict[str, torch.Tensor] = {}
    if MG_EMBED in full:
        out[HF_EMBED] = full[MG_EMBED]
    layers = sorted({int(n.split(".")[2]) for n in full if n.startswith("decoder.layers.")})
    for i in layers:
        names = mg_layer_names(i, bias)
        hf_t = megatron_layer_to_hf({role: full[n] for role, n in names.items()}, shape, bias)
        for role, hf_name in hf_layer_names(i, bias).items():
            out[hf_name] = hf_t[role]
    if MG_FINAL_NORM in full:
        out[HF_FINAL_NORM] = full[MG_FINAL_NORM]
    if MG_OUTPUT in full and not tied:
        out[HF_LM_HEAD] = full[MG_OUTPUT]
    return out


def write_hf_checkpoint(module, st: ParallelState, hf_config, out_dir: str | Path, side_files_from: str | Path | None) -> Path:
    """Write the live policy as an HF checkpoint (safetensors, one file per pipeline
    stage, with an index; config and tokenizer files copied from ``side_files_from``).
    Collective: every rank calls it."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    if st.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    if dist.is_initialized():
        dist.barrier()
    file_name = f"model-{st.pp_rank + 1:05d}-of-{st.pp_size:05d}.safetensors"
    weight_map: dict[str, str] = {}
    if st.dp_rank == 0:
        full = gather_stage_full_layout(module, st)
        if st.tp_rank == 0:
            tensors = {k: v.contiguous() for k, v in full_layout_stage_to_hf(full, hf_config).items()}
            save_file(tensors, str(out / file_name), metadata={"format": "pt"})
            weight_map = {k: file_name for k in tensors}
    maps = [weight_map]
    if dist.is_initialized() and st.world_size > 1:
        gathered: list = [None] * st.world_size
        dist.all_gather_object(gathered, weight_map)
        maps = gathered
    if st.rank == 0:
        merged = {k: v for m in maps for k, v in m.items()}
        total = 0
        for f in set(merged.values()):
            total += (out / f).stat().st_size
        (out / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": dict(sorted(merged.items()))}, indent=2)
        )
        if side_files_from is not None:
            for name in _HF_SIDE_FILES:
                src = Path(side_files_from) / name
                if src.is_file():
                    shutil.copy2(src, out / name)
    if dist.is_initialized():
        dist.barrier()
    return out
