"""Supported HF architectures and their HF <-> Megatron parameter maps.

One declarative map per architecture, keyed by the HF ``architectures`` field.
Megatron tensors are named here in their *full* (TP=1) layout with global layer
numbers; ``megatron_hpt.models.weights`` splits them per TP rank and PP stage.

Layout facts (checked against HF logits): Megatron's fused QKV weight is
interleaved per KV group, ``[q (heads_per_group*d), k (d), v (d)]`` for each
group; ``linear_fc1`` is ``cat(gate, up)``; both families use rotate-half RoPE,
as Megatron does by default.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from megatron_hpt.config import Registry


@dataclass(frozen=True)
class ArchSpec:
    """What distinguishes one HF causal-LM architecture for conversion."""

    hf_architecture: str
    qkv_bias: Callable[[object], bool]
    """Whether q/k/v projections carry biases, read from the HF config."""


ARCHITECTURES: Registry[ArchSpec] = Registry("HF architecture")
ARCHITECTURES.add("Qwen2ForCausalLM", ArchSpec("Qwen2ForCausalLM", qkv_bias=lambda hf: True))
ARCHITECTURES.add(
    "LlamaForCausalLM",
    ArchSpec("LlamaForCausalLM", qkv_bias=lambda hf: bool(getattr(hf, "attention_bias", False))),
)


def arch_for(hf) -> ArchSpec:
    """The ArchSpec of an HF config, from its ``architectures`` field."""
    archs = list(getattr(hf, "architectures", None) or [])
    for name in archs:
        if name in ARCHITECTURES:
            return ARCHITECTURES.get(name)
    supported = ", ".join(ARCHITECTURES.names())
    raise ValueError(
        f"HF config field architectures={archs} is not supported (supported: {supported})"
    )


# --------------------------------------------------------------------------- #
# Names
# --------------------------------------------------------------------------- #
def hf_layer_names(i: int, qkv_bias: bool) -> dict[str, str]:
    """HF tensor names of layer i, keyed by role."""
    p = f"model.layers.{i}."
    names = {
        "input_norm": p + "input_layernorm.weight",
        "q": p + "self_attn.q_proj.weight",
        "k": p + "self_attn.k_proj.weight",
        "v": p + "self_attn.v_proj.weight",
        "o": p + "self_attn.o_proj.weight",
        "post_norm": p + "post_attention_layernorm.weight",
        "gate": p + "mlp.gate_proj.weight",
        "up": p + "mlp.up_proj.weight",
        "down": p + "mlp.down_proj.weight",
    }
    if qkv_bias:
        names.update(q_bias=p + "self_attn.q_proj.bias", k_bias=p + "self_attn.k_proj.bias",
                     v_bias=p + "self_attn.v_proj.bias")
    return names


HF_EMBED = "model.embed_tokens.weight"
HF_FINAL_NORM = "model.norm.weight"
HF_LM_HEAD = "lm_head.weight"

MG_EMBED = "embedding.word_embeddings.weight"
MG_FINAL_NORM = "decoder.final_layernorm.weight"
MG_OUTPUT = "output_layer.weight"


def mg_layer_names(i: int, qkv_bias: bool, te: bool = False) -> dict[str, str]:
    """Megatron tensor names of (global) layer i, keyed by role; ``te`` for the TE spec,
    which fuses the norms into the following linear layers."""
    p = f"decoder.layers.{i}."
    names = {
        "input_norm": p + ("self_attention.linear_qkv.layer_norm_weight" if te else "input_layernorm.weight"),
        "qkv": p + "self_attention.linear_qkv.weight",
        "o": p + "self_attention.linear_proj.weight",
        "post_norm": p + ("mlp.linear_fc1.layer_norm_weight" if te else "pre_mlp_layernorm.weight"),
        "fc1": p + "mlp.linear_fc1.weight",
        "down": p + "mlp.linear_fc2.weight",
    }
    if qkv_bias:
        names["qkv_bias"] = p + "self_attention.linear_qkv.bias"
    return names


# --------------------------------------------------------------------------- #
# Tensor transforms between the HF and the full Megatron layout
# --------------------------------------------------------------------------- #
@dataclass(frozen=True)
class AttentionShape:
    num_heads: int
    num_kv_heads: int
    head_dim: int

    @property
    def heads_per_group(self) -> int:
        return self.num_heads // self.num_kv_heads


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, shape: AttentionShape) -> torch.Tensor:
    """HF q, k, v (weights [out, in] or biases [out]) -> Megatron's group-interleaved QKV."""
    g, hpg, d = shape.num_kv_heads, shape.heads_per_group, shape.head_dim
    rest = q.shape[1:]
    qg = q.reshape(g, hpg * d, *rest)
    kg = k.reshape(g, d, *rest)
    vg = v.reshape(g, d, *rest)
    return torch.cat([qg, kg, vg], dim=1).reshape(g * (hpg + 2) * d, *rest)


def split_qkv(qkv: torch.Tensor, shape: AttentionShape) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Megatron's group-interleaved QKV -> HF q, k, v."""
    g, hpg, d = shape.num_kv_heads, shape.heads_per_group, shape.head_dim
    rest = qkv.shape[1:]
    grouped = qkv.reshape(g, (hpg + 2) * d, *rest)
    q, k, v = torch.split(grouped, [hpg * d, d, d], dim=1)
    return (q.reshape(g * hpg * d, *rest).contiguous(), k.reshape(g * d, *rest).contiguous(),
            v.reshape(g * d, *rest).contiguous())


def hf_layer_to_megatron(hf_t: dict[str, torch.Tensor], shape: AttentionShape, qkv_bias: bool) -> dict[str, torch.Tensor]:
    """One layer's tensors by role: HF -> full Megatron layout."""
    out = {
        "input_norm": hf_t["input_norm"],
        "qkv": fuse_qkv(hf_t["q"], hf_t["k"], hf_t["v"], shape),
        "o": hf_t["o"],
        "post_norm": hf_t["post_norm"],
        "fc1": torch.cat([hf_t["gate"], hf_t["up"]], dim=0),
        "down": hf_t["down"],
    }
    if qkv_bias:
        out["qkv_bias"] = fuse_qkv(hf_t["q_bias"], hf_t["k_bias"], hf_t["v_bias"], shape)
    return out


def megatron_layer_to_hf(mg_t: dict[str, torch.Tensor], shape: AttentionShape, qkv_bias: bool) -> dict[str, torch.Tensor]:
    """One layer's tensors by role: full Megatron layout -> HF."""
    q, k, v = split_qkv(mg_t["qkv"], shape)
    gate, up = torch.chunk(mg_t["fc1"], 2, dim=0)
    out = {
        "input_norm": mg_t["input_norm"],
        "q": q, "k": k, "v": v,
        "o": mg_t["o"],
        "post_norm": mg_t["post_norm"],
        "gate": gate.contiguous(), "up": up.contiguous(),
        "down": mg_t["down"],
    }
    if qkv_bias:
        out["q_bias"], out["k_bias"], out["v_bias"] = split_qkv(mg_t["qkv_bias"], shape)
    return out


# How each Megatron role is split across TP ranks: (dim, gated). None = replicated.
TP_SPLIT: dict[str, tuple[int, bool] | None] = {
    "input_norm": None,
    "qkv": (0, False),  # contiguous KV groups per rank (the layout is group-interleaved)
    "qkv_bias": (0, False),
    "o": (1, False),
    "post_norm": None,
    "fc1": (0, True),  # gate and up are split separately, then concatenated per rank
    "down": (1, False),
    "embed": (0, False),
    "output": (0, False),
    "final_norm": None,
}
