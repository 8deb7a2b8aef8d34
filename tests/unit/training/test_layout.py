"""How a run lays out its micro-batches: packing chosen by the config, the padding multiple
FP8 GEMMs and tensor parallelism need, and the attention share of a row's work."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from megatron_hpt.models import ModelConfig
from megatron_hpt.training.config import TrainStepConfig
from megatron_hpt.training.policy import attention_tokens, pad_multiple, resolve_layout


@pytest.mark.parametrize("packing,layout", [("auto", "packed"), ("packed", "packed"), ("padded", "padded")])
def test_auto_packs(packing, layout):
    assert resolve_layout(TrainStepConfig(packing=packing)) == layout


def test_pad_multiple_for_fp8_gemms_and_tensor_parallelism():
    bf16 = ModelConfig(hf_path="x")
    mxfp8 = ModelConfig(hf_path="x", fp8="e4m3", fp8_recipe="mxfp8")
    tensorwise = ModelConfig(hf_path="x", fp8="e4m3", fp8_recipe="tensorwise")
    assert pad_multiple(bf16, 1, cuda=False) == 1
    assert pad_multiple(bf16, 2, cuda=False) == 2
    assert pad_multiple(bf16, 1, cuda=True) == 16
    assert pad_multiple(tensorwise, 1, cuda=True) == 16
    assert pad_multiple(mxfp8, 1, cuda=True) == 32
    assert pad_multiple(bf16, 3, cuda=True) == 48
    assert pad_multiple(mxfp8, 8, cuda=True) == 32
    # the recipe matters only when FP8 is on
    assert pad_multiple(ModelConfig(hf_path="x", fp8_recipe="mxfp8"), 1, cuda=True) == 16


def test_attention_tokens_at_the_qwen2_5_7b_shape():
    hf = SimpleNamespace(hidden_size=3584, num_attention_heads=28, num_key_value_heads=4, head_dim=128,
                         intermediate_size=18944)
    # per layer: q, k, v, o projections 3584 x 128 x (28 + 4 + 4 + 28), MLP 3 x 3584 x 18944
    params_per_layer = 3584 * 128 * 64 + 3 * 3584 * 18944
    assert attention_tokens(hf) == params_per_layer / (28 * 128) == pytest.approx(65024.0)
