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


def head_dim(hf) -> int:
    return getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads


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


def hf_layer_to_megatron(
    hf_t: dict[str, torch.Tensor], shape: AttentionShape, qkv_bias: bool, *, split_fc1: bool = False
) -> dict[str, torch.Tensor | tuple[torch.Tensor, torch.Tensor]]:
    """One layer's tensors by role: HF -> full Megatron layout. With ``split_fc1``,
    fc1 is the pair (gate, up) rather than their concatenation (no copy)."""
    gate_up = (hf_t["gate"], hf_t["up"])
    out = {
        "input_norm": hf_t["input_norm"],
        "qkv": fuse_qkv(hf_t["q"], hf_t["k"], hf_t["v"], shape),
        "o": hf_t["o"],
        "post_norm": hf_t["post_norm"],
        "fc1": gate_up if split_fc1 else torch.cat(gate_up, dim=0),
        "down": hf_t["down"],
    }
    if qkv_bias:
        out["qkv_bias"] = fuse_qkv(hf_t["q_bias"], hf_t["k_bias"], hf_t["v_bias"], shape)
    return out


# The HF roles each Megatron layer role becomes (in HF's order within the role).
HF_ROLES_OF: dict[str, tuple[str, ...]] = {
    "input_norm": ("input_norm",),
    "qkv": ("q", "k", "v"),
    "qkv_bias": ("q_bias", "k_bias", "v_bias"),
    "o": ("o",),
    "post_norm": ("post_norm",),
    "fc1": ("gate", "up"),
    "down": ("down",),
}


def megatron_role_to_hf(
    role: str, tensor: torch.Tensor | tuple[torch.Tensor, torch.Tensor], shape: AttentionShape
) -> dict[str, torch.Tensor]:
    """One Megatron layer tensor (full layout) -> its HF tensors by HF role.
    fc1 may be given as the pair (gate, up)."""
    if role in ("qkv", "qkv_bias"):
        return dict(zip(HF_ROLES_OF[role], split_qkv(tensor, shape)))
    if role == "fc1":
        gate, up = tensor if isinstance(tensor, tuple) else torch.chunk(tensor, 2, dim=0)
        return {"gate": gate.contiguous(), "up": up.contiguous()}
    return {HF_ROLES_OF[role][0]: tensor}


def megatron_layer_to_hf(mg_t: dict[str, torch.Tensor | tuple[torch.Tensor, torch.Tensor]], shape: AttentionShape, qkv_bias: bool) -> dict[str, torch.Tensor]:
    """One layer's tensors by role: full Megatron layout -> HF. fc1 may be given
    as the pair (gate, up)."""
    out: dict[str, torch.Tensor] = {}
    for role, tensor in mg_t.items():
        if role == "qkv_bias" and not qkv_bias:
            continue
        out.update(megatron_role_to_hf(role, tensor, shape))
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


# --------------------------------------------------------------------------- #
# Expected shapes, and the keys of the dist checkpoint
# --------------------------------------------------------------------------- #
@dataclass(frozen=True)
class ExpectedShape:
    """A tensor's shape as the HF config dictates, with the fields it comes from."""

    shape: tuple[int, ...]
    derivation: str
    """How the shape follows from the config, for error messages."""


def _dims(hf) -> dict[str, int]:

    return dict(
        hidden=hf.hidden_size,
        ffn=hf.intermediate_size,
        vocab=hf.vocab_size,
        heads=hf.num_attention_heads,
        kv_heads=getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads,
        head_dim=head_dim(hf),
    )


def hf_expected_shapes(hf) -> dict[str, ExpectedShape]:
    """Every HF tensor the parameter map reads, with the shape the config implies."""
    d = _dims(hf)
    h, f, v = d["hidden"], d["ffn"], d["vocab"]
    q, kv = d["heads"] * d["head_dim"], d["kv_heads"] * d["head_dim"]
    hs = f"hidden_size={h}"
    qs = f"num_attention_heads={d['heads']} x head_dim={d['head_dim']}"
    kvs = f"num_key_value_heads={d['kv_heads']} x head_dim={d['head_dim']}"
    fs = f"intermediate_size={f}"
    by_role = {
        "input_norm": ExpectedShape((h,), hs),
        "post_norm": ExpectedShape((h,), hs),
        "q": ExpectedShape((q, h), f"({qs}, {hs})"),
        "k": ExpectedShape((kv, h), f"({kvs}, {hs})"),
        "v": ExpectedShape((kv, h), f"({kvs}, {hs})"),
        "q_bias": ExpectedShape((q,), qs),
        "k_bias": ExpectedShape((kv,), kvs),
        "v_bias": ExpectedShape((kv,), kvs),
        "o": ExpectedShape((h, q), f"({hs}, {qs})"),
        "gate": ExpectedShape((f, h), f"({fs}, {hs})"),
        "up": ExpectedShape((f, h), f"({fs}, {hs})"),
        "down": ExpectedShape((h, f), f"({hs}, {fs})"),
    }
    bias = arch_for(hf).qkv_bias(hf)
    out = {HF_EMBED: ExpectedShape((v, h), f"(vocab_size={v}, {hs})")}
    for i in range(hf.num_hidden_layers):
        for role, name in hf_layer_names(i, bias).items():
            out[name] = by_role[role]
    out[HF_FINAL_NORM] = ExpectedShape((h,), hs)
    if not getattr(hf, "tie_word_embeddings", False):
        out[HF_LM_HEAD] = ExpectedShape((v, h), f"(vocab_size={v}, {hs})")
    return out


# Megatron-core's dist checkpoints name layer tensors without the layer number
# (the layer is a leading axis of a global tensor) and use the Transformer
# Engine spec's names for the norms, whichever spec saved them: the local spec
# maps its `input_layernorm` / `pre_mlp_layernorm` onto TE's fused-norm names
# (`sharded_state_dict_keys_map` in megatron's gpt_layer_specs). So one
# checkpoint loads into either spec.
CKPT_LAYER_PREFIX = "decoder.layers."
CKPT_EXTRA_STATE_MODULES = (
    "self_attention.linear_proj",
    "self_attention.linear_qkv",
    "mlp.linear_fc1",
    "mlp.linear_fc2",
)
"""Linear layers whose (empty, for the local spec) `_extra_state` objects a
model's sharded state dict holds for every layer."""


def checkpoint_layer_key(role: str) -> str:
    """The dist-checkpoint key of a layer tensor role (shared by all layers)."""
    te_name = mg_layer_names(0, qkv_bias=True, te=True)[role]
    return CKPT_LAYER_PREFIX + te_name[len("decoder.layers.0."):]


def megatron_full_shapes(hf) -> dict[str, tuple[int, ...]]:
    """Full-layout (TP=1) shapes of the Megatron tensors, by role."""
    d = _dims(hf)
    h, f, v = d["hidden"], d["ffn"], d["vocab"]
    q, kv = d["heads"] * d["head_dim"], d["kv_heads"] * d["head_dim"]
    shapes = {
        "embed": (v, h),
        "input_norm": (h,),
        "qkv": (q + 2 * kv, h),
        "o": (h, q),
        "post_norm": (h,),
        "fc1": (2 * f, h),
        "down": (h, f),
        "final_norm": (h,),
        "output": (v, h),
    }
    if arch_for(hf).qkv_bias(hf):
        shapes["qkv_bias"] = (q + 2 * kv,)
    return shapes
