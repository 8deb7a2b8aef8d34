"""The HF <-> full-layout weight map: both directions invert each other bit-exactly,
the role-major walk agrees with the layer-major one, and TP shards merge back."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from megatron_hpt.models import load_hf_config
from megatron_hpt.models.weights import (
    hf_names_by_role,
    hf_to_full_layout,
    hf_to_roles,
    megatron_roles_to_hf,
    role_of,
    tp_merge,
    tp_shard,
)


@pytest.mark.parametrize("name", ["qwen2", "qwen2_tied", "llama"])
def test_weight_map_round_trips(tiny_hf_models, name):
    hf = load_hf_config(tiny_hf_models[name])
    tensors = load_file(str(tiny_hf_models[name] / "model.safetensors"))
    if hf.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    full = dict(hf_to_full_layout(hf, tensors.__getitem__))

    # The role-major walk (used by the converters) gives the same tensors as the layer-major one...
    by_role: dict[str, dict] = {}
    for role, layer, t in hf_to_roles(hf, tensors.__getitem__, split_fc1=True):
        by_role.setdefault(role, {})[layer] = t
        local = full[next(k for k in full if role_of(k) == (k, role) and _layer(k) == layer)]
        assert torch.equal(torch.cat(t) if role == "fc1" else t, local)
    # ... and its inverse gives every HF tensor back bit-exactly, in the order the converters write.
    back = list(megatron_roles_to_hf(hf, lambda role: dict(by_role[role])))
    assert [n for n, _ in back] == [name for _, _, name in hf_names_by_role(hf)]
    assert sorted(n for n, _ in back) == sorted(tensors)
    assert all(torch.equal(t, tensors[n]) for n, t in back)

    # TP shards of every tensor merge back to it.
    for key, t in full.items():
        role = role_of(key)[1]
        assert torch.equal(tp_merge([tp_shard(t, role, r, 2) for r in range(2)], role), t), key


def _layer(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[2]) if parts[:2] == ["decoder", "layers"] else None
