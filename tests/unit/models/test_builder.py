"""GPTModel construction across megatron-core releases: the tensor-parallel attributes of
split weights are right whether megatron set them itself (0.17+) or left them to us (0.16)."""

from __future__ import annotations

import pytest
import torch

from megatron_hpt.models import ModelConfig, build_gpt_model, load_hf_config
from megatron_hpt.models.builder import mark_tensor_parallel_params
from tests.unit.models.test_checkpoint_format import one_rank


def _split_weights(model) -> dict[str, int]:
    """name -> partition dim of every weight the TP layers split (megatron's own classes)."""
    from megatron.core import tensor_parallel as mtp

    dims = {mtp.ColumnParallelLinear: 0, mtp.RowParallelLinear: 1, mtp.VocabParallelEmbedding: 0}
    out = {}
    for name, module in model.named_modules():
        for cls, dim in dims.items():
            if isinstance(module, cls) and getattr(module, "weight", None) is not None:
                out[f"{name}.weight"] = dim
    return out


@pytest.fixture()
def model(tiny_hf_models):
    hf_dir = tiny_hf_models["qwen2"]
    with one_rank():
        yield build_gpt_model(load_hf_config(hf_dir), ModelConfig(hf_path=str(hf_dir)))


def test_every_split_weight_is_marked_with_its_partition_dim(model):
    split = _split_weights(model)
    # embedding, output layer, and per layer qkv, proj, fc1, fc2
    assert len(split) == 2 + 4 * 4
    params = dict(model.named_parameters())
    for name, dim in split.items():
        p = params[name]
        # (the stride is megatron's: 0.19 says 2 for the gated fc1, 0.16 leaves it to us: 1)
        assert (p.tensor_model_parallel, p.partition_dim) == (True, dim), name
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate

    # what grad-norm clipping asks: a split weight is counted on every TP rank
    assert all(param_is_not_tensor_parallel_duplicate(params[n]) for n in split)


def test_attributes_megatron_already_set_are_accepted(model):
    """megatron-core 0.17+ marks the weights in the layers even without initialization: marking
    again (as build_gpt_model does after them) must keep them, not assert they are unset."""
    mark_tensor_parallel_params(model)  # the model is marked once already: this is the 0.17+ case
    for name, p in model.named_parameters():
        if name in _split_weights(model):
            assert p.tensor_model_parallel and p.partition_dim == _split_weights(model)[name]


def test_conflicting_partition_dim_is_an_error_naming_the_weight(model):
    fc2 = model.decoder.layers[0].mlp.linear_fc2.weight
    fc2.partition_dim = 0  # a RowParallelLinear is split along dim 1
    with pytest.raises(AssertionError, match=r"decoder\.layers\.0\.mlp\.linear_fc2\.weight: .*dim 0, expected 1"):
        mark_tensor_parallel_params(model)
    assert isinstance(fc2, torch.nn.Parameter)
