"""The dist-checkpoint format written without a model matches what megatron's
own sharded_state_dict produces; names line up with the Transformer Engine spec;
the model-side save/load API checks what it loads."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch

from megatron_hpt.models import ModelConfig, build_gpt_model, load_hf_config
from megatron_hpt.models.architectures import checkpoint_layer_key, mg_layer_names
from megatron_hpt.models.checkpoint import (
    METADATA_FILE,
    CheckpointMismatch,
    load_model_checkpoint,
    read_checkpoint_metadata,
    save_model_checkpoint,
)
from megatron_hpt.models.checkpoint_format import (
    CheckpointLayout,
    FullLayoutReader,
    FullLayoutWriter,
    process_group,
)
from megatron_hpt.models.hf_checkpoint import HFCheckpointReader
from megatron_hpt.models.weights import hf_to_roles, role_of


@contextlib.contextmanager
def one_rank():
    from megatron_hpt.parallel import ParallelConfig, destroy_parallel, init_parallel

    with process_group():
        state = init_parallel(ParallelConfig())
        try:
            yield state
        finally:
            destroy_parallel()


def _describe(sharded_state_dict) -> set:
    """(key, global shape, offset, fragmentation, local shape, dtype) of every shard."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, ShardedTensorFactory

    out = set()
    for value in sharded_state_dict.values():
        for entry in value if isinstance(value, list) else [value]:
            built = entry.build() if isinstance(entry, ShardedTensorFactory) else [entry]
            for sh in built:
                if isinstance(sh, ShardedTensor):
                    out.add((sh.key, sh.global_shape, sh.global_offset, sh.axis_fragmentations,
                             sh.local_shape, sh.dtype, sh.prepend_axis_num))
                else:
                    assert isinstance(sh, ShardedObject)
                    out.add((sh.key, sh.global_shape, sh.global_offset))
    return out


@pytest.mark.parametrize("name", ["qwen2", "qwen2_tied", "llama"])
def test_writer_produces_the_model_sharded_state_dict(tiny_hf_models, name):
    hf_dir = tiny_hf_models[name]
    hf = load_hf_config(hf_dir)
    writer = FullLayoutWriter(CheckpointLayout.from_hf(hf))
    with HFCheckpointReader(hf_dir, hf) as reader:
        for role, layer, tensor in hf_to_roles(hf, reader.get, split_fc1=True):
            writer.add(role, layer, tensor)
        mine = _describe(writer.sharded_state_dict())
    with one_rank():
        model = build_gpt_model(hf, ModelConfig(hf_path=str(hf_dir)))
        theirs = _describe(model.sharded_state_dict())
    assert mine == theirs


def test_writer_refuses_incomplete_or_misshapen_input(tiny_hf_models):
    hf = load_hf_config(tiny_hf_models["qwen2"])
    writer = FullLayoutWriter(CheckpointLayout.from_hf(hf))
    with pytest.raises(ValueError, match=r"decoder\.layers\.2\.self_attention\.linear_qkv\.weight: shape"):
        writer.add("qkv", 2, torch.zeros(3, 3))
    writer.add("embed", None, torch.zeros(512, 128))
    with pytest.raises(ValueError, match="given twice"):
        writer.add("embed", None, torch.zeros(512, 128))
    with pytest.raises(ValueError, match=r"incomplete: no tensor given for decoder\.final_layernorm\.weight"):
        writer.sharded_state_dict()


def test_checkpoint_keys_are_transformer_engine_names():
    """The local spec saves its norms under TE's fused-norm names, so one checkpoint
    serves both specs; the layer-stacked keys are TE's names without the layer number."""
    assert checkpoint_layer_key("input_norm") == "decoder.layers.self_attention.linear_qkv.layer_norm_weight"
    assert checkpoint_layer_key("post_norm") == "decoder.layers.mlp.linear_fc1.layer_norm_weight"
    assert checkpoint_layer_key("qkv") == "decoder.layers.self_attention.linear_qkv.weight"
    assert checkpoint_layer_key("qkv_bias") == "decoder.layers.self_attention.linear_qkv.bias"
    assert checkpoint_layer_key("o") == "decoder.layers.self_attention.linear_proj.weight"
    assert checkpoint_layer_key("fc1") == "decoder.layers.mlp.linear_fc1.weight"
    assert checkpoint_layer_key("down") == "decoder.layers.mlp.linear_fc2.weight"
    for layer in (0, 7):
        local, te = mg_layer_names(layer, True, te=False), mg_layer_names(layer, True, te=True)
        for role in local:
            # TE state-dict names map to the same role and to the local spec's canonical name.
            assert role_of(te[role]) == (local[role], role)
            assert role_of(local[role]) == (local[role], role)
            # Dropping the layer number from the TE name gives the checkpoint key.
            assert te[role].replace(f"layers.{layer}.", "layers.") == checkpoint_layer_key(role)
    assert role_of("decoder.layers.3.self_attention.linear_qkv.layer_norm_weight")[1] == "input_norm"
    assert role_of("decoder.layers.3.mlp.linear_fc1.layer_norm_weight")[1] == "post_norm"
    with pytest.raises(KeyError, match="core_attention"):
        role_of("decoder.layers.0.self_attention.core_attention.weight")


def test_local_model_saves_under_the_checkpoint_keys(tiny_hf_models):
    hf = load_hf_config(tiny_hf_models["qwen2"])
    with one_rank():
        model = build_gpt_model(hf, ModelConfig(hf_path=str(tiny_hf_models["qwen2"])))
        keys = {k for k, _, _, *rest in _describe(model.sharded_state_dict()) if rest}
    layout = CheckpointLayout.from_hf(hf)
    assert keys == set(layout.manifest())


def test_save_load_round_trip_and_metadata(tiny_hf_models, converted_checkpoints, tmp_path):
    """load_model_checkpoint of a converted checkpoint, save_model_checkpoint with
    extra state, load both back: bit-exact parameters, extra state restored."""
    hf_dir = tiny_hf_models["qwen2_tied"]
    hf = load_hf_config(hf_dir)
    out = tmp_path / "saved"
    with one_rank():
        model = build_gpt_model(hf, ModelConfig(hf_path=str(hf_dir)))
        assert load_model_checkpoint(model, converted_checkpoints["qwen2_tied"]) == {}
        params = {k: v.clone() for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
        save_model_checkpoint(model, out, hf_dir=hf_dir, extra_state=lambda sd: {"step": 7})
        with pytest.raises(FileExistsError, match="exists"):
            save_model_checkpoint(model, out)
        fresh = build_gpt_model(hf, ModelConfig(hf_path=str(hf_dir)))
        extra = load_model_checkpoint(fresh, out, extra_state=lambda sd: {"step": None})
        assert extra == {"step": 7}
        for k, v in fresh.state_dict().items():
            if not k.endswith("_extra_state"):
                assert torch.equal(v, params[k]), k
    assert not (tmp_path / "saved.tmp").exists()
    meta = read_checkpoint_metadata(out)
    assert meta["written_at"]["tensor_model_parallel_size"] == 1
    assert meta["hf_architecture"] == "Qwen2ForCausalLM" and meta["dtype"] == "float32"
    assert meta["extra_state"] == ["step"]
    assert "output_layer.weight" not in meta["manifest"]  # tied: stored once, as the embedding
    assert meta["manifest"]["decoder.layers.mlp.linear_fc1.weight"]["shape"] == [4, 768, 128]
    assert json.loads((out / "hf" / "config.json").read_text())["tie_word_embeddings"] is True


def test_load_names_the_missing_or_misshapen_tensor(tiny_hf_models, converted_checkpoints):
    from megatron_hpt.models.tiny import TinyModelSpec, build_hf_config, build_tokenizer

    ckpt = converted_checkpoints["qwen2"]
    hf = load_hf_config(tiny_hf_models["qwen2"])
    wider = build_hf_config(TinyModelSpec(intermediate_size=256), build_tokenizer())
    tied = load_hf_config(tiny_hf_models["qwen2_tied"])
    with one_rank():
        with pytest.raises(CheckpointMismatch, match=r"decoder\.layers\.mlp\.linear_fc1\.weight has global shape"):
            load_model_checkpoint(build_gpt_model(wider, ModelConfig(hf_path="unused")), ckpt)
        # A tied checkpoint has no output layer; an untied model needs one.
        with pytest.raises(CheckpointMismatch, match=r"output_layer\.weight .* is missing"):
            load_model_checkpoint(build_gpt_model(hf, ModelConfig(hf_path="unused")),
                                  converted_checkpoints["qwen2_tied"])
        with pytest.raises(CheckpointMismatch, match="has no optimizer"):
            load_model_checkpoint(build_gpt_model(tied, ModelConfig(hf_path="unused")),
                                  converted_checkpoints["qwen2_tied"],
                                  extra_state=lambda sd: {"optimizer": _fake_optimizer_entry()})


def _fake_optimizer_entry():
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    return ShardedTensor.from_rank_offsets("optimizer.state.exp_avg.embedding", torch.zeros(4), replica_id=0)


def test_reader_reads_every_role_bit_exactly(tiny_hf_models, converted_checkpoints):
    hf_dir = tiny_hf_models["llama"]
    hf = load_hf_config(hf_dir)
    layout = CheckpointLayout.from_hf(hf)
    reader = FullLayoutReader(converted_checkpoints["llama"], layout)
    with HFCheckpointReader(hf_dir, hf) as source:
        expected = {}
        for role, layer, tensor in hf_to_roles(hf, source.get, split_fc1=True):
            expected[(role, layer)] = tensor
        for role in layout.global_roles + layout.layer_roles:
            for layer, got in reader.read_role(role).items():
                want = expected.pop((role, layer))
                if role == "fc1":
                    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
                else:
                    assert torch.equal(got, want), (role, layer)
    assert not expected
    assert (converted_checkpoints["llama"] / METADATA_FILE).is_file()


def test_trainer_style_checkpoint_converts_with_an_explicit_config(tiny_hf_models, converted_checkpoints, tmp_path):
    """A checkpoint as the trainer saves it (model + optimizer state + counters, no
    hf/ and no metadata file) converts to HF and reshards when given the config."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    from safetensors.torch import load_file

    from megatron_hpt.models.conversion import convert_megatron_to_hf, reshard_checkpoint

    hf_dir = tiny_hf_models["qwen2"]
    hf = load_hf_config(hf_dir)
    trainer_ckpt = tmp_path / "step_000003"
    trainer_ckpt.mkdir()
    with one_rank():
        model = build_gpt_model(hf, ModelConfig(hf_path=str(hf_dir)))
        load_model_checkpoint(model, converted_checkpoints["qwen2"])
        state = {
            "model": model.sharded_state_dict(),
            "optimizer": {"exp_avg": ShardedTensor.from_rank_offsets("optimizer.exp_avg", torch.ones(8), replica_id=0)},
            "step": 3,
        }
        dist_checkpointing.save(state, str(trainer_ckpt))
    with pytest.raises(FileNotFoundError, match="pass the HF directory"):
        convert_megatron_to_hf(trainer_ckpt, tmp_path / "hf", verify=False, log=lambda *_: None)
    convert_megatron_to_hf(trainer_ckpt, tmp_path / "hf", hf_config_dir=hf_dir, verify=False, log=lambda *_: None)
    original, back = load_file(str(hf_dir / "model.safetensors")), load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert set(original) == set(back) and all(torch.equal(back[k], v) for k, v in original.items())
    reshard_checkpoint(trainer_ckpt, tmp_path / "r", tp=2, pp=2, hf_config_dir=hf_dir, verify=False,
                       log=lambda *_: None)
    manifest = read_checkpoint_metadata(tmp_path / "r")["manifest"]
    assert not any(key.startswith("optimizer") for key in manifest)  # only model weights are carried over
    assert read_checkpoint_metadata(tmp_path / "r")["source"]["written_at"] is None
