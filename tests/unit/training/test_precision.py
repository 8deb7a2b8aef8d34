"""FP8 is a configured, consistent precision: a config whose importance ratio would mix
FP8 and BF16 log-probs is refused with the reason."""

from __future__ import annotations

import pytest

from megatron_hpt.models import ModelConfig
from megatron_hpt.training.config import PrecisionConfig
from megatron_hpt.training.precision import PrecisionConfigError, validate_precision


def model(**kw):
    return ModelConfig(hf_path="x", precision="bf16", **kw)


def test_bf16_everywhere_is_fine():
    validate_precision(model(), PrecisionConfig())


def test_fp8_old_logprobs_without_fp8_training_is_refused():
    with pytest.raises(PrecisionConfigError, match="would divide BF16 by FP8"):
        validate_precision(model(), PrecisionConfig(old_logprobs="fp8"))


def test_fp8_training_with_bf16_old_logprobs_is_refused():
    with pytest.raises(PrecisionConfigError, match="would divide FP8 by non-FP8"):
        validate_precision(model(fp8="e4m3"), PrecisionConfig(old_logprobs="model"))


def test_recipes_must_match():
    with pytest.raises(PrecisionConfigError, match="fp8_recipe=delayed differs"):
        validate_precision(model(fp8="e4m3", fp8_recipe="tensorwise"), PrecisionConfig(old_logprobs="fp8", fp8_recipe="delayed"))


def test_consistent_fp8_and_fp8_reference_need_an_fp8_gpu_here():
    # The configs are consistent; on this machine (no TE / no FP8 GPU) they fail on hardware, saying so.
    for m, p in [(model(fp8="e4m3"), PrecisionConfig(old_logprobs="fp8")), (model(), PrecisionConfig(ref_logprobs="fp8"))]:
        with pytest.raises(PrecisionConfigError, match="needs Transformer Engine and an FP8-capable GPU"):
            validate_precision(m, p)
