"""The conversion tools in one process: HF -> Megatron -> HF round trips bit-exactly,
verification runs and fails loudly, and wrong inputs are errors naming the tensor
or the config field. (The TP/PP layouts are in tests/multiproc.)"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from checkpoints_tools import hf_to_megatron as hf_to_megatron_cli
from checkpoints_tools import make_tiny_model as make_tiny_model_cli
from checkpoints_tools import megatron_to_hf as megatron_to_hf_cli
from checkpoints_tools import reshard as reshard_cli
from megatron_hpt.models.checkpoint import read_checkpoint_metadata
from megatron_hpt.models.conversion import convert_hf_to_megatron, convert_megatron_to_hf, reshard_checkpoint
from megatron_hpt.models.hf_checkpoint import SAFE_INDEX
from megatron_hpt.models.verification import LogitsMismatch, verify_checkpoint

QUIET = dict(log=lambda *_: None)


def _hf_tensors(hf_dir: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(hf_dir.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.mark.parametrize("name", ["qwen2", "qwen2_tied", "llama"])
def test_hf_megatron_hf_round_trip_is_bit_exact(tiny_hf_models, converted_checkpoints, tmp_path, name):
    out = tmp_path / "hf"
    convert_megatron_to_hf(converted_checkpoints[name], out, verify=False, max_shard_size="1MB", **QUIET)
    original, back = _hf_tensors(tiny_hf_models[name]), _hf_tensors(out)
    assert (out / SAFE_INDEX).is_file()  # 1MB shards: the index path is exercised
    assert set(back) == set(original)
    for tensor_name, tensor in original.items():
        assert back[tensor_name].dtype == tensor.dtype and torch.equal(back[tensor_name], tensor), tensor_name
    for aux in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / aux).is_file(), aux
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok.apply_chat_template([{"role": "user", "content": "1+1"}], tokenize=False).startswith("<|im_start|>user")


def test_conversions_verify_logits_and_record_it(tiny_hf_models, tmp_path):
    """Verification on (the default): TP=PP=1 runs in this process."""
    ckpt = tmp_path / "ckpt"
    report = convert_hf_to_megatron(tiny_hf_models["llama"], ckpt, dtype="bf16", **QUIET)
    assert report["verification"]["passed"] and report["verification"]["max_abs_diff"] < 1e-4
    meta = read_checkpoint_metadata(ckpt)
    assert meta["dtype"] == "bfloat16" and meta["verification"]["passed"]
    assert meta["source"] == {"kind": "hf", "path": str(tiny_hf_models["llama"].resolve())}
    hf_out = tmp_path / "hf"
    back = convert_megatron_to_hf(ckpt, hf_out, **QUIET)
    assert back["verification"]["passed"]
    assert json.loads((hf_out / "config.json").read_text())["dtype"] == "bfloat16"
    original, got = _hf_tensors(tiny_hf_models["llama"]), _hf_tensors(hf_out)
    for name, tensor in original.items():
        assert got[name].dtype == torch.bfloat16 and torch.equal(got[name], tensor.to(torch.bfloat16)), name


def test_reshard_in_one_process_verifies_against_the_source(converted_checkpoints, tmp_path):
    report = reshard_checkpoint(converted_checkpoints["qwen2_tied"], tmp_path / "r", tp=1, pp=1, **QUIET)
    assert report["verification"]["passed"]
    assert read_checkpoint_metadata(tmp_path / "r")["source"]["kind"] == "megatron"


def test_verification_fails_loudly_and_leaves_no_output(tiny_hf_models, converted_checkpoints, tmp_path):
    # The tied model's checkpoint checked against another model's HF weights.
    with pytest.raises(LogitsMismatch, match=r"max \|HF - Megatron\| = .* FAILED"):
        verify_checkpoint(converted_checkpoints["qwen2_tied"], tiny_hf_models["qwen2"], **QUIET)
    # A tolerance nothing can meet: the conversion raises and removes its output.
    out = tmp_path / "ckpt"
    with pytest.raises(LogitsMismatch):
        convert_hf_to_megatron(tiny_hf_models["qwen2"], out, atol=-1.0, rtol=0.0, **QUIET)
    assert not out.exists() and not (tmp_path / "ckpt.tmp").exists()


def _copy_model(src: Path, dst: Path, edit_tensors=None, edit_config=None) -> Path:
    shutil.copytree(src, dst)
    if edit_tensors:
        tensors = load_file(str(dst / "model.safetensors"))
        edit_tensors(tensors)
        save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    if edit_config:
        config = json.loads((dst / "config.json").read_text())
        edit_config(config)
        (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_missing_tensor_is_named(tiny_hf_models, tmp_path):
    src = _copy_model(tiny_hf_models["qwen2"], tmp_path / "m",
                      edit_tensors=lambda t: t.pop("model.layers.3.mlp.down_proj.weight"))
    with pytest.raises(ValueError, match=r"tensor model\.layers\.3\.mlp\.down_proj\.weight is missing"):
        convert_hf_to_megatron(src, tmp_path / "out", **QUIET)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.tmp").exists()


def test_shape_mismatch_is_named(tiny_hf_models, tmp_path):
    def widen(t):
        t["model.layers.0.mlp.gate_proj.weight"] = torch.zeros(400, 128)

    src = _copy_model(tiny_hf_models["qwen2"], tmp_path / "m", edit_tensors=widen)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.gate_proj\.weight has shape \(400, 128\).*intermediate_size=384"):
        convert_hf_to_megatron(src, tmp_path / "out", **QUIET)


def test_unsupported_architecture_is_named(tiny_hf_models, tmp_path):
    def mistral(c):
        c["architectures"] = ["MistralForCausalLM"]
        c["model_type"] = "mistral"

    src = _copy_model(tiny_hf_models["llama"], tmp_path / "m", edit_config=mistral)
    with pytest.raises(ValueError, match=r"architectures=\['MistralForCausalLM'\] is not supported.*LlamaForCausalLM"):
        convert_hf_to_megatron(src, tmp_path / "out", **QUIET)


def test_tp_that_does_not_divide_heads_is_named(tiny_hf_models, converted_checkpoints, tmp_path):
    with pytest.raises(ValueError, match="num_attention_heads=4 is not divisible by tensor_model_parallel_size=3"):
        convert_hf_to_megatron(tiny_hf_models["qwen2"], tmp_path / "out", tp=3, **QUIET)
    with pytest.raises(ValueError, match="num_hidden_layers=4 is not divisible by pipeline_model_parallel_size=3"):
        reshard_checkpoint(converted_checkpoints["qwen2"], tmp_path / "r", tp=1, pp=3, **QUIET)
    with pytest.raises(ValueError, match="num_key_value_heads=2 is not divisible by tensor_model_parallel_size=4"):
        convert_megatron_to_hf(converted_checkpoints["qwen2"], tmp_path / "h", verify_tp=4, **QUIET)


def test_megatron_to_hf_names_a_checkpoint_of_another_model(tiny_hf_models, converted_checkpoints, tmp_path):
    def fewer_kv_heads(c):
        c["num_key_value_heads"] = 1

    other = _copy_model(tiny_hf_models["qwen2"], tmp_path / "cfg", edit_config=fewer_kv_heads)
    with pytest.raises(ValueError, match=r"tensor decoder\.layers\.self_attention\.linear_qkv\.weight has shape"):
        convert_megatron_to_hf(converted_checkpoints["qwen2"], tmp_path / "h", hf_config_dir=other, **QUIET)


def test_existing_output_needs_overwrite(tiny_hf_models, converted_checkpoints):
    with pytest.raises(FileExistsError, match="--overwrite"):
        convert_hf_to_megatron(tiny_hf_models["qwen2"], converted_checkpoints["qwen2"], verify=False, **QUIET)


def test_command_lines(tmp_path, capsys):
    """make_tiny_model and hf_to_megatron through their argument parsers; one
    real `python -m` run for the exit status and the message of a bad input."""
    assert make_tiny_model_cli.main([str(tmp_path / "t"), "--architecture", "LlamaForCausalLM",
                                     "--llama3-rope-scaling", "--tie-word-embeddings", "--num-layers", "2"]) == 0
    config = json.loads((tmp_path / "t" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["num_hidden_layers"] == 2
    assert config["tie_word_embeddings"] is True
    assert (config.get("rope_parameters") or config.get("rope_scaling"))["rope_type"] == "llama3"
    assert hf_to_megatron_cli.main([str(tmp_path / "t"), str(tmp_path / "c"), "--no-verify", "--pp", "2"]) == 0
    assert read_checkpoint_metadata(tmp_path / "c")["target_layout"]["pipeline_model_parallel_size"] == 2
    assert hf_to_megatron_cli.main([str(tmp_path / "t"), str(tmp_path / "c2"), "--tp", "3"]) == 1
    assert "num_attention_heads=4 is not divisible by tensor_model_parallel_size=3" in capsys.readouterr().err
    assert reshard_cli.main([str(tmp_path / "c"), str(tmp_path / "r"), "--tp", "1", "--pp", "1", "--no-verify"]) == 0
    assert read_checkpoint_metadata(tmp_path / "r")["target_layout"]["pipeline_model_parallel_size"] == 1
    assert megatron_to_hf_cli.main([str(tmp_path / "r"), str(tmp_path / "hf"), "--no-verify"]) == 0
    assert (tmp_path / "hf" / "config.json").is_file()
    assert megatron_to_hf_cli.main([str(tmp_path / "r"), str(tmp_path / "hf"), "--no-verify"]) == 1
    assert "--overwrite" in capsys.readouterr().err
    run = subprocess.run(
        [sys.executable, "-m", "checkpoints_tools.hf_to_megatron", str(tmp_path / "nowhere"), str(tmp_path / "x")],
        capture_output=True, text=True, cwd=Path(__file__).resolve().parents[3], timeout=120,
    )
    assert run.returncode == 1 and "no config.json" in run.stderr
