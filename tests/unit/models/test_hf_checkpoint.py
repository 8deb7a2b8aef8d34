"""HF checkpoint I/O: the streamed safetensors writer against safetensors' own
reader and transformers; the lazy reader's checks."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from megatron_hpt.models import load_hf_config
from megatron_hpt.models.hf_checkpoint import (
    SAFE_INDEX,
    HFCheckpointReader,
    SafetensorsShardWriter,
    TensorPlan,
    aux_files,
    parse_size,
)


def _tensors():
    gen = torch.Generator().manual_seed(0)
    return {
        "a": torch.randn(3, 5, generator=gen),
        "b.bf16": torch.randn(7, generator=gen).to(torch.bfloat16),
        "c": torch.randn(4, 4, generator=gen).to(torch.float16),
        "d": torch.arange(6, dtype=torch.int64).reshape(2, 3),
    }


@pytest.mark.parametrize("max_bytes,num_files", [(10**9, 1), (64, 3)])
def test_writer_output_reads_back_exactly(tmp_path, max_bytes, num_files):
    tensors = _tensors()
    plan = [TensorPlan(n, tuple(t.shape), t.dtype) for n, t in tensors.items()]
    writer = SafetensorsShardWriter(tmp_path, plan, max_bytes)
    for name, tensor in tensors.items():
        writer.write(name, tensor)
    files = writer.close()
    assert len(files) == num_files
    back = {}
    for f in files:
        back.update(load_file(str(tmp_path / f)))
    assert set(back) == set(tensors)
    for name, tensor in tensors.items():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor)
    if num_files > 1:
        index = json.loads((tmp_path / SAFE_INDEX).read_text())
        assert set(index["weight_map"]) == set(tensors)
        assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    with safe_open(str(tmp_path / files[0]), "pt") as f:
        assert f.metadata() == {"format": "pt"}


def test_writer_enforces_the_plan(tmp_path):
    plan = [TensorPlan("a", (2,), torch.float32), TensorPlan("b", (3,), torch.float32)]
    writer = SafetensorsShardWriter(tmp_path, plan)
    with pytest.raises(ValueError, match="tensor b arrived where a was planned"):
        writer.write("b", torch.zeros(3))
    with pytest.raises(ValueError, match=r"tensor a: shape \(3,\), planned \(2,\)"):
        writer.write("a", torch.zeros(3))
    writer.write("a", torch.zeros(2))
    with pytest.raises(ValueError, match="tensor b .* was never written"):
        writer.close()


def test_sharded_hf_output_loads_in_transformers(tiny_hf_models, tmp_path):
    """A model re-written through the streamed writer in 4 shards loads with
    from_pretrained and has the same weights."""
    from transformers import AutoModelForCausalLM

    src = tiny_hf_models["qwen2"]
    tensors = load_file(str(src / "model.safetensors"))
    plan = [TensorPlan(n, tuple(t.shape), t.dtype) for n, t in tensors.items()]
    writer = SafetensorsShardWriter(tmp_path, plan, parse_size("1MB"))
    for name, tensor in tensors.items():
        writer.write(name, tensor)
    assert len(writer.close()) == 4
    for p in aux_files(src):
        shutil.copy(p, tmp_path / p.name)
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, tensors[name]), name


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size("500MB") == 500 * 10**6
    assert parse_size(123) == 123


def test_reader_names_a_missing_tensor(tiny_hf_models, tmp_path):
    src = tiny_hf_models["qwen2"]
    shutil.copytree(src, tmp_path / "m")
    tensors = load_file(str(src / "model.safetensors"))
    del tensors["model.layers.2.self_attn.k_proj.bias"]
    save_file(tensors, str(tmp_path / "m" / "model.safetensors"), metadata={"format": "pt"})
    hf = load_hf_config(tmp_path / "m")
    with pytest.raises(ValueError, match=r"tensor model\.layers\.2\.self_attn\.k_proj\.bias is missing"):
        HFCheckpointReader(tmp_path / "m", hf).check()


def test_reader_names_a_misshapen_tensor_and_the_config_fields(tiny_hf_models, tmp_path):
    src = tiny_hf_models["llama"]
    shutil.copytree(src, tmp_path / "m")
    tensors = load_file(str(src / "model.safetensors"))
    tensors["model.layers.1.self_attn.k_proj.weight"] = torch.zeros(128, 128)
    save_file(tensors, str(tmp_path / "m" / "model.safetensors"), metadata={"format": "pt"})
    hf = load_hf_config(tmp_path / "m")
    with pytest.raises(
        ValueError,
        match=r"tensor model\.layers\.1\.self_attn\.k_proj\.weight has shape \(128, 128\), but config\.json "
        r"implies \(64, 128\) = \(num_key_value_heads=2 x head_dim=32, hidden_size=128\)",
    ):
        HFCheckpointReader(tmp_path / "m", hf).check()


def test_reader_reports_unused_tensors_and_reads_lazily(tiny_hf_models, tmp_path):
    src = tiny_hf_models["qwen2_tied"]
    shutil.copytree(src, tmp_path / "m")
    tensors = load_file(str(src / "model.safetensors"))
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()  # some tied checkpoints carry it
    save_file(tensors, str(tmp_path / "m" / "model.safetensors"), metadata={"format": "pt"})
    with HFCheckpointReader(tmp_path / "m", load_hf_config(tmp_path / "m")) as reader:
        assert reader.check() == ["lm_head.weight"]
        got = reader.get("model.norm.weight")
        assert torch.equal(got, tensors["model.norm.weight"])


def test_reader_without_safetensors_says_what_to_do(tmp_path, tiny_hf_models):
    shutil.copy(tiny_hf_models["qwen2"] / "config.json", tmp_path / "config.json")
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="safe_serialization=True"):
        HFCheckpointReader(tmp_path, load_hf_config(tmp_path))
