"""Weights between HF tensors, the full Megatron layout, and one rank's shards.

The *full layout* names every Megatron tensor as a TP=1, PP=1 model would
(global layer numbers); a rank's model holds TP shards of the layers of its
pipeline stage with local layer numbers. Everything here works one tensor at
a time so that conversion streams layer by layer.
"""

from __future__ import annotations

import re
from typing import Callable, Iterator

import torch

from megatron_hpt.models.architectures import (
    HF_EMBED,
    HF_FINAL_NORM,
    HF_LM_HEAD,
    MG_EMBED,
    MG_FINAL_NORM,
    MG_OUTPUT,
    HF_ROLES_OF,
    TP_SPLIT,
    AttentionShape,
    arch_for,
    hf_layer_names,
    hf_layer_to_megatron,
    megatron_role_to_hf,
    mg_layer_names,
)

_LAYER_RE = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


def attention_shape(hf) -> AttentionShape:
    from megatron_hpt.models.architectures import head_dim

    return AttentionShape(
        num_heads=hf.num_attention_heads,
        num_kv_heads=getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads,
        head_dim=head_dim(hf),
    )


def role_of(name: str) -> tuple[str, str]:
    """(canonical name, role) of a Megatron tensor name of the local or the TE spec.

    The canonical name is the local spec's; TE's fused-norm names map onto it.
    Raises KeyError for a name outside the Qwen2/Llama parameter map."""
    if name == MG_EMBED:
        return name, "embed"
    if name == MG_OUTPUT:
        return name, "output"
    if name == MG_FINAL_NORM:
        return name, "final_norm"
    m = _LAYER_RE.match(name)
    if m:
        layer = int(m.group(1))
        canonical = mg_layer_names(layer, True, te=False)
        for te in (False, True):
            for role, full in mg_layer_names(layer, True, te).items():
                if full == name:
                    return canonical[role], role
    raise KeyError(f"Megatron tensor {name!r} is not part of the Qwen2/Llama parameter map")


def tp_shard(full: torch.Tensor, role: str, tp_rank: int, tp_size: int) -> torch.Tensor:
    """This TP rank's shard of a full-layout tensor."""
    split = TP_SPLIT[role]
    if split is None or tp_size == 1:
        return full
    dim, gated = split
    if gated:
        gate, up = torch.chunk(full, 2, dim=dim)
        return torch.cat(
            [torch.chunk(gate, tp_size, dim=dim)[tp_rank], torch.chunk(up, tp_size, dim=dim)[tp_rank]],
            dim=dim,
        )
    if full.shape[dim] % tp_size:
        raise ValueError(f"{role}: dim {dim} of shape {tuple(full.shape)} is not divisible by TP={tp_size}")
    return torch.chunk(full, tp_size, dim=dim)[tp_rank]


def tp_merge(shards: list[torch.Tensor], role: str) -> torch.Tensor:
    """Inverse of tp_shard: the full-layout tensor from every TP rank's shard."""
    split = TP_SPLIT[role]
    if split is None or len(shards) == 1:
        return shards[0]
    dim, gated = split
    if gated:
        halves = [torch.chunk(s, 2, dim=dim) for s in shards]
        return torch.cat([torch.cat([h[0] for h in halves], dim=dim), torch.cat([h[1] for h in halves], dim=dim)], dim=dim)
    return torch.cat(shards, dim=dim)


def local_to_global(name: str, layer_offset: int) -> str:
    m = _LAYER_RE.match(name)
    if not m:
        return name
    return f"decoder.layers.{int(m.group(1)) + layer_offset}.{m.group(2)}"


def model_tensors(model) -> dict[str, torch.Tensor]:
    """Parameters (and buffers that are weights) of a megatron model, TE extra state excluded."""
    return {k: v for k, v in model.state_dict(keep_vars=True).items() if not k.endswith("_extra_state")}


def layer_offset(model, pp_rank: int) -> int:
    per = model.config.num_layers // model.config.pipeline_model_parallel_size
    return pp_rank * per


@torch.no_grad()
def load_full_layout(
    model,
    get_full: Callable[[str], torch.Tensor],
    *,
    tp_rank: int,
    tp_size: int,
    pp_rank: int,
) -> None:
    """Copy weights into this rank's model: ``get_full(global_name)`` returns the
    full-layout tensor; its TP shard is copied into the matching parameter.
    The tied output layer of a last stage without the embedding reads the embedding."""
    offset = layer_offset(model, pp_rank)
    for name, param in model_tensors(model).items():
        global_name, role = role_of(local_to_global(name, offset))
        if role == "output" and getattr(model, "share_embeddings_and_output_weights", False):
            full = get_full(MG_EMBED)
        else:
            full = get_full(global_name)
        shard = tp_shard(full, role, tp_rank, tp_size)
        if shard.shape != param.shape:
            raise ValueError(
                f"tensor {global_name}: checkpoint shard has shape {tuple(shard.shape)}, "
                f"the model expects {tuple(param.shape)} (TP={tp_size})"
            )
        param.copy_(shard.to(param.dtype))


# --------------------------------------------------------------------------- #
# HF <-> full Megatron layout, streamed one layer at a time
# --------------------------------------------------------------------------- #
def hf_to_full_layout(hf, get_hf: Callable[[str], torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (Megatron full-layout name, tensor) from HF tensors, layer by layer."""
    spec = arch_for(hf)
    bias = spec.qkv_bias(hf)
    shape = attention_shape(hf)
    tied = bool(getattr(hf, "tie_word_embeddings", False))
    yield MG_EMBED, get_hf(HF_EMBED)
    for i in range(hf.num_hidden_layers):
        hf_names = hf_layer_names(i, bias)
        mg = hf_layer_to_megatron({role: get_hf(n) for role, n in hf_names.items()}, shape, bias)
        mg_names = mg_layer_names(i, bias)
        for role, tensor in mg.items():
            yield mg_names[role], tensor
    yield MG_FINAL_NORM, get_hf(HF_FINAL_NORM)
    if not tied:
        yield MG_OUTPUT, get_hf(HF_LM_HEAD)


def hf_to_roles(
    hf, get_hf: Callable[[str], torch.Tensor], *, split_fc1: bool = False
) -> Iterator[tuple[str, int | None, torch.Tensor | tuple[torch.Tensor, torch.Tensor]]]:
    """Yield (role, global layer or None, full-layout tensor) from HF tensors, layer by layer.

    With ``split_fc1`` the gated MLP's fc1 comes as the pair (gate, up) instead of
    their concatenation, so a writer that stores the halves separately (the dist
    checkpoint does) needs no copy of them."""
    spec = arch_for(hf)
    bias = spec.qkv_bias(hf)
    shape = attention_shape(hf)
    yield "embed", None, get_hf(HF_EMBED)
    for i in range(hf.num_hidden_layers):
        hf_t = {role: get_hf(n) for role, n in hf_layer_names(i, bias).items()}
        mg = hf_layer_to_megatron(hf_t, shape, bias, split_fc1=split_fc1)
        for role, tensor in mg.items():
            yield role, i, tensor
    yield "final_norm", None, get_hf(HF_FINAL_NORM)
    if not getattr(hf, "tie_word_embeddings", False):
        yield "output", None, get_hf(HF_LM_HEAD)


MEGATRON_ROLE_ORDER = ("embed", "input_norm", "qkv", "qkv_bias", "o", "post_norm", "fc1", "down", "final_norm", "output")


def megatron_roles(hf) -> list[str]:
    """The Megatron roles a model has, in the order conversions walk them."""
    bias = arch_for(hf).qkv_bias(hf)
    tied = bool(getattr(hf, "tie_word_embeddings", False))
    return [r for r in MEGATRON_ROLE_ORDER if not (r == "qkv_bias" and not bias) and not (r == "output" and tied)]


def hf_names_by_role(hf) -> list[tuple[str, int | None, str]]:
    """(Megatron role, layer, HF name) of every HF tensor, role-major: the order in
    which ``megatron_roles_to_hf`` yields them."""
    bias = arch_for(hf).qkv_bias(hf)
    globals_ = {"embed": HF_EMBED, "final_norm": HF_FINAL_NORM, "output": HF_LM_HEAD}
    out = []
    for role in megatron_roles(hf):
        if role in globals_:
            out.append((role, None, globals_[role]))
            continue
        for i in range(hf.num_hidden_layers):
            names = hf_layer_names(i, bias)
            out.extend((role, i, names[hf_role]) for hf_role in HF_ROLES_OF[role])
    return out


def megatron_roles_to_hf(
    hf, read_role: Callable[[str], dict[int | None, torch.Tensor | tuple[torch.Tensor, torch.Tensor]]]
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name, tensor) role by role: ``read_role(role)`` returns that role's
    full-layout tensors by layer (``{None: t}`` for embed/final_norm/output), so a
    caller holds one role of all layers at a time; each layer's tensors are
    dropped once yielded."""
    bias = arch_for(hf).qkv_bias(hf)
    shape = attention_shape(hf)
    globals_ = {"embed": HF_EMBED, "final_norm": HF_FINAL_NORM, "output": HF_LM_HEAD}
    for role in megatron_roles(hf):
        by_layer = read_role(role)
        if role in globals_:
            yield globals_[role], by_layer.pop(None)
            continue
        for i in range(hf.num_hidden_layers):
            names = hf_layer_names(i, bias)
            for hf_role, tensor in megatron_role_to_hf(role, by_layer.pop(i), shape).items():
                yield names[hf_role], tensor
