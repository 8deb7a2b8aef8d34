"""FP8 is a configured, consistent precision: a config whose importance ratio would mix
FP8 and BF16 log-probs is refused with the reason."""

from __future__ import annotations

import sys
import types

import pytest

from megatron_hpt.models import ModelConfig
from megatron_hpt.training.config import PrecisionConfig
from megatron_hpt.training.precision import PrecisionConfigError, fp8_support, validate_precision


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


# ------------------------------------------------------------------ FP8 support as TE reports it
def _install_fake_te(monkeypatch, pytorch_attrs: dict, fp8_module_attrs: dict | None = None):
    """Stand-ins for ``transformer_engine`` and ``transformer_engine.pytorch`` (and, for TE
    releases before ``is_fp8_available``, ``transformer_engine.pytorch.fp8``)."""
    top = types.ModuleType("transformer_engine")
    te = types.ModuleType("transformer_engine.pytorch")
    for k, v in pytorch_attrs.items():
        setattr(te, k, v)
    top.pytorch = te
    monkeypatch.setitem(sys.modules, "transformer_engine", top)
    monkeypatch.setitem(sys.modules, "transformer_engine.pytorch", te)
    if fp8_module_attrs is not None:
        fp8 = types.ModuleType("transformer_engine.pytorch.fp8")
        for k, v in fp8_module_attrs.items():
            setattr(fp8, k, v)
        # importable, but not an attribute of the package until imported (as in TE)
        monkeypatch.setitem(sys.modules, "transformer_engine.pytorch.fp8", fp8)
    else:
        monkeypatch.delitem(sys.modules, "transformer_engine.pytorch.fp8", raising=False)
    return te


def _te_220(ok: bool, reason: str = "", calls: list | None = None):
    """TE 2.20's API: ``is_fp8_available(return_reason=...)`` and its siblings; no ``fp8``
    attribute, since ``import transformer_engine.pytorch`` no longer imports that module."""
    def answer(name):
        def check(return_reason: bool = False):
            if calls is not None:
                calls.append((name, return_reason))
            return (ok, reason) if return_reason else ok
        return check

    return {n: answer(n) for n in ("is_fp8_available", "is_fp8_block_scaling_available", "is_mxfp8_available")}


def test_te_220_without_an_fp8_attribute_reports_fp8_available(monkeypatch):
    calls: list = []
    te = _install_fake_te(monkeypatch, _te_220(True, calls=calls))
    assert not hasattr(te, "fp8")
    assert fp8_support("tensorwise") == (True, "")
    # a consistent FP8 config is accepted, asking TE for the recipes it uses
    validate_precision(model(fp8="e4m3"), PrecisionConfig(old_logprobs="fp8"))
    validate_precision(model(fp8="e4m3", fp8_recipe="blockwise"),
                       PrecisionConfig(old_logprobs="fp8", fp8_recipe="blockwise"))
    assert ("is_fp8_available", True) in calls and ("is_fp8_block_scaling_available", True) in calls


def test_te_reason_is_in_the_error(monkeypatch):
    reason = "Device compute capability 8.9 or higher required for FP8 execution."
    _install_fake_te(monkeypatch, _te_220(False, reason))
    assert fp8_support("tensorwise") == (False, reason)
    with pytest.raises(PrecisionConfigError, match=r"FP8 \(tensorwise\) cannot run here: Device compute capability 8\.9"):
        validate_precision(model(), PrecisionConfig(ref_logprobs="fp8"))


def test_older_te_is_asked_through_its_fp8_module(monkeypatch):
    _install_fake_te(monkeypatch, {}, {"check_fp8_support": lambda: (True, ""),
                                       "check_fp8_block_scaling_support": lambda: (False, "needs sm90")})
    assert fp8_support("tensorwise") == (True, "")
    assert fp8_support("blockwise") == (False, "needs sm90")


def test_a_failing_te_check_is_not_read_as_unavailable(monkeypatch):
    def broken(return_reason=False):
        raise RuntimeError("CUDA driver initialization failed")

    _install_fake_te(monkeypatch, {"is_fp8_available": broken})
    with pytest.raises(RuntimeError, match="CUDA driver initialization failed"):
        validate_precision(model(fp8="e4m3"), PrecisionConfig(old_logprobs="fp8"))


def test_te_with_neither_check_is_an_error(monkeypatch):
    _install_fake_te(monkeypatch, {})
    with pytest.raises(ImportError, match="transformer_engine.pytorch.fp8"):
        fp8_support("tensorwise")


def test_delayed_scaling_is_refused_for_old_logprobs(monkeypatch):
    _install_fake_te(monkeypatch, _te_220(True))
    with pytest.raises(PrecisionConfigError, match="fp8_recipe=delayed for old-policy log-probs: delayed scaling updates"):
        validate_precision(model(fp8="e4m3", fp8_recipe="delayed"), PrecisionConfig(old_logprobs="fp8", fp8_recipe="delayed"))
    # the reference model's KL log-probs enter no ratio: delayed is allowed there
    validate_precision(model(), PrecisionConfig(ref_logprobs="fp8", fp8_recipe="delayed"))
