"""Old log-probs of later mini-batches are computed in exactly the micro-batches the training
step uses. With FP8 current (per-tensor) scaling a row's log-probs depend on the other rows of
its micro-batch; here an output quantized with the micro-batch's own amax stands in for it on
CPU. With the updates skipped (weights unchanged), every mini-batch's importance ratio must
then be exactly 1: it is not when old log-probs come from differently composed micro-batches."""

from __future__ import annotations

import pytest
import torch

from megatron_hpt.data.types import TrainBatch
from tests.multiproc.training_fixtures import mixed_rows


def per_tensor_scaled(module, inputs, output):
    """Round the logits to 1/8 of the micro-batch's amax (straight-through gradient, so the
    grad norm is not 0 and the tiny skip threshold skips every update)."""
    out, bias = output
    amax = out.detach().abs().amax()
    q = torch.round(out / amax * 8) * (amax / 8)
    return out + (q - out).detach(), bias


@pytest.fixture()
def trainer(tiny_qwen2):
    from megatron_hpt.models import load_hf_config
    from megatron_hpt.models.checkpoint_format import process_group
    from megatron_hpt.parallel import ParallelConfig, destroy_parallel, init_parallel
    from megatron_hpt.trainer.config import load_run_config
    from megatron_hpt.trainer.loop import Trainer
    from megatron_hpt.training.hf_weights import load_hf_weights
    from megatron_hpt.training.policy import MegatronPolicy

    cfg = load_run_config("demo-cpu", [
        f"model.hf_path={tiny_qwen2}", "train.rollout_batch_size=4", "train.mini_batch_size=2", "train.epochs=1",
        "train.step.max_tokens_per_microbatch=64",  # 2 micro-batches per mini-batch here
        "train.step.optimizer.skip_grad_norm_above=1e-9", "train.step.optimizer.warmup_steps=0",
    ])
    with process_group():
        st = init_parallel(ParallelConfig())
        try:
            hf = load_hf_config(tiny_qwen2)
            t = object.__new__(Trainer)  # the loop's state without the outside world (servers, data)
            t.cfg, t.st, t.reference = cfg, st, None
            t.loss_config = cfg.algorithm.loss_config()
            t.rows_per_prompt, t.verl_num_ranks = cfg.rollout.n, None  # global normalization
            t.policy = MegatronPolicy(hf, cfg.model, cfg.train.step, st, total_optimizer_steps=10)
            load_hf_weights(t.policy.module, st, hf, str(tiny_qwen2))
            t.policy.module.output_layer.register_forward_hook(per_tensor_scaled)
            yield t
        finally:
            destroy_parallel()


def test_later_minibatch_ratio_is_exactly_one_with_micro_batch_dependent_numerics(trainer):
    from megatron_hpt.trainer.loop import Timer
    from megatron_hpt.training.batching import minibatch_split

    rows = mixed_rows()
    mbs = minibatch_split([r.group for r in rows], 2)
    # the later mini-batch mixes SFT and RL rows: its training micro-batches hold both
    assert {rows[i].kind for i in mbs[1]} == {"sft", "rl"}
    metrics = trainer._train_on(TrainBatch(rows=rows), Timer())
    assert trainer.policy.skipped_steps == 2 and trainer.policy.optimizer_steps == 0  # weights unchanged
    assert metrics["ratio/max"] == 1.0  # averaged over both mini-batches, each exactly 1
    assert metrics["actor/ppo_kl"] == 0.0
