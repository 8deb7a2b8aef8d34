"""The paper recipes start on a machine with Transformer Engine: their policy is built with the
recipe's own model and training-step settings while TE reads as present (here forced: the TE
layer spec is asked for, and served by the local spec, since this machine has no TE).
``packing: auto`` (the recipes' default) must not stop the start."""

from __future__ import annotations

import pytest

PAPER_RECIPES = ["hpt-qwen2.5-math-7b-8gpu", "hpt-qwen2.5-math-1.5b-8gpu", "hpt-llama3.1-8b-8gpu"]


@pytest.fixture()
def te_present(monkeypatch):
    """TE reads as importable with CUDA; the TE layer spec requests are recorded."""
    from megatron.core.models.gpt import gpt_layer_specs

    from megatron_hpt.models import builder

    asked: list = []

    def te_spec(*args, **kwargs):
        asked.append(kwargs)
        return gpt_layer_specs.get_gpt_layer_local_spec(normalization="RMSNorm")

    monkeypatch.setattr(builder, "te_available", lambda: True)
    monkeypatch.setattr(gpt_layer_specs, "get_gpt_layer_with_transformer_engine_spec", te_spec)
    return asked


@pytest.mark.parametrize("recipe", PAPER_RECIPES)
def test_paper_recipe_builds_its_policy_with_te_present(recipe, te_present, tiny_hf_models):
    from megatron_hpt.models import load_hf_config
    from megatron_hpt.models.checkpoint_format import process_group
    from megatron_hpt.parallel import ParallelConfig, destroy_parallel, init_parallel
    from megatron_hpt.trainer.config import load_run_config
    from megatron_hpt.training.policy import MegatronPolicy

    # the recipe as shipped, on the tiny model of its architecture and one rank
    arch = "llama" if "llama" in recipe else "qwen2"
    cfg = load_run_config(recipe, [f"model.hf_path={tiny_hf_models[arch]}", "parallel.tensor_model_parallel_size=1",
                                   "data_parallel_size=1"])
    assert cfg.train.step.packing == "auto" and cfg.model.transformer_impl == "auto"
    with process_group():
        st = init_parallel(ParallelConfig())
        try:
            policy = MegatronPolicy(load_hf_config(cfg.model.hf_path), cfg.model, cfg.train.step, st,
                                    total_optimizer_steps=cfg.train.steps * cfg.train.minibatches_per_step)
        finally:
            destroy_parallel()
    assert len(te_present) == 1  # the model was built with the TE spec: TE was seen as present
    assert policy.cost_model.layout == "packed"  # "auto" packs (THD with TE)
    assert policy.lr == cfg.train.step.optimizer.lr == 5e-6
