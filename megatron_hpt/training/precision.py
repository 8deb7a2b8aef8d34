"""Log-prob precision: FP8 as a configured, consistent choice, never a silent default.

Measured on an H100 (DESIGN.md §3): FP8 log-probs differ from BF16 by 0.165 on
average (29% of tokens off by more than 20% in exp(dlogp)); BF16 vs FP32 by 0.032.
An importance ratio pi_theta / pi_old must therefore never mix FP8 and BF16
numerics: old-policy log-probs run FP8 exactly when the training forward does,
with the same recipe. The reference model (KL) may run FP8 on its own.
"""

from __future__ import annotations

import importlib
from contextlib import contextmanager

from megatron_hpt.config import ConfigError
from megatron_hpt.models import ModelConfig
from megatron_hpt.training.config import PrecisionConfig

# megatron's fp8_recipe names -> Transformer Engine recipe classes
_TE_RECIPES = {
    "tensorwise": "Float8CurrentScaling",
    "delayed": "DelayedScaling",
    "blockwise": "Float8BlockScaling",
}


class PrecisionConfigError(ConfigError):
    """A precision setting that would mix FP8 and BF16 numerics in one ratio, or needs TE."""


def validate_precision(model_cfg: ModelConfig, precision: PrecisionConfig) -> None:
    """Refuse configs whose importance ratio would mix FP8 and BF16 numerics."""
    train_fp8 = model_cfg.fp8 != "none"
    old_fp8 = precision.old_logprobs == "fp8"
    if old_fp8 and not train_fp8:
        raise PrecisionConfigError(
            "train.step.precision.old_logprobs=fp8 but the training forward runs without FP8 "
            "(model.fp8=none): the importance ratio pi_theta/pi_old would divide BF16 by FP8 "
            "log-probs, which differ by 0.165 nats on average on a real model. Set model.fp8=e4m3 "
            "with the same recipe, or old_logprobs=model."
        )
    if train_fp8 and not old_fp8:
        raise PrecisionConfigError(
            f"model.fp8={model_cfg.fp8} trains with FP8 forwards but "
            f"train.step.precision.old_logprobs={precision.old_logprobs}: the importance ratio "
            "would divide FP8 by non-FP8 log-probs. Set old_logprobs=fp8 (same recipe)."
        )
    if old_fp8 and precision.fp8_recipe != model_cfg.fp8_recipe:
        raise PrecisionConfigError(
            f"train.step.precision.fp8_recipe={precision.fp8_recipe} differs from "
            f"model.fp8_recipe={model_cfg.fp8_recipe}: old-policy log-probs must use the training "
            "forward's FP8 recipe, or the ratio mixes two FP8 numerics."
        )
    if old_fp8 and precision.fp8_recipe == "delayed":
        raise PrecisionConfigError(
            "train.step.precision.fp8_recipe=delayed for old-policy log-probs: delayed scaling "
            "updates its amax history with every forward, so the training forward would not "
            "reproduce the old log-probs of the same weights (the ratio would not start at 1). "
            "Use tensorwise (current scaling) or blockwise, for model.fp8_recipe too."
        )
    recipes = {model_cfg.fp8_recipe} if train_fp8 else set()
    if old_fp8 or precision.ref_logprobs == "fp8":
        recipes.add(precision.fp8_recipe)
    for recipe in sorted(recipes):
        ok, reason = fp8_support(recipe)
        if not ok:
            raise PrecisionConfigError(
                f"FP8 ({recipe}) cannot run here: {reason}. It needs Transformer Engine and an "
                "FP8-capable GPU (sm89+; blockwise sm90+, mxfp8 sm100+): install the gpu extra on "
                "such a machine, or use bf16/model precision."
            )


# recipe name -> (TE 2.x function in transformer_engine.pytorch, the older fp8-module function)
_TE_SUPPORT_CHECKS = {
    "tensorwise": ("is_fp8_available", "check_fp8_support"),
    "delayed": ("is_fp8_available", "check_fp8_support"),
    "blockwise": ("is_fp8_block_scaling_available", "check_fp8_block_scaling_support"),
    "mxfp8": ("is_mxfp8_available", "check_mxfp8_support"),
}


def fp8_support(recipe: str = "tensorwise") -> tuple[bool, str]:
    """(available, why not) for an FP8 recipe, as Transformer Engine reports it.

    Asks ``te.is_fp8_available(return_reason=True)`` (and its block-scaling / MXFP8
    siblings); TE releases without it answer through ``transformer_engine.pytorch.fp8``,
    imported explicitly (TE 2.20 no longer imports that module by itself). Nothing is
    swallowed: a TE that answers neither way, or whose check fails, raises.
    """
    try:
        import transformer_engine.pytorch as te
    except ImportError as err:
        return False, f"Transformer Engine is not importable ({err})"
    current, legacy = _TE_SUPPORT_CHECKS[recipe]
    check = getattr(te, current, None)
    if check is not None:
        answer = check(return_reason=True)
    else:
        fp8_module = importlib.import_module("transformer_engine.pytorch.fp8")
        answer = getattr(fp8_module, legacy)()
    ok, reason = answer
    return bool(ok), reason or ""


def te_recipe(name: str):
    """The Transformer Engine recipe object for a megatron fp8_recipe name."""
    from transformer_engine.common import recipe

    return getattr(recipe, _TE_RECIPES[name])()


@contextmanager
def fp8_autocast(recipe_name: str):
    """Run forwards under TE FP8 with the given recipe (TE 2.20 names it ``autocast``,
    older TE ``fp8_autocast``). Logits and the log-softmax stay fp32 outside it."""
    import transformer_engine.pytorch as te

    rec = te_recipe(recipe_name)
    if hasattr(te, "autocast"):
        ctx = te.autocast(enabled=True, recipe=rec)
    else:
        ctx = te.fp8_autocast(enabled=True, fp8_recipe=rec)
    with ctx:
        yield
