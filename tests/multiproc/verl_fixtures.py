"""Rank functions for the verl-normalization test: MegatronPolicy's training step under
normalization ``verl`` at DP=2, and the official code's aggregation computed through the
same model in one process (``tests/official_verl.py``)."""

from __future__ import annotations

from dataclasses import replace

import torch

from tests.multiproc.training_fixtures import _policy, mixed_rows
from tests.official_verl import hpt_microbatch_loss, official_minibatch_objective, official_split

PHYSICAL_BUDGET = 28  # this run's own micro-batch budget: it cuts some verl micro-batches further
RESPONSE_LENGTH = 32  # the token-sum divisor (the padded response length)
SFT_COEF, ENTROPY = 0.3, 0.01
GROUP = 3  # rollouts per RL prompt in mixed_rows


def _loss_config():
    from megatron_hpt.losses import get_preset

    return replace(get_preset("hpt"), normalization="verl", sft_weight=SFT_COEF, entropy_coef=ENTROPY)


def _main_grads(policy, st):
    from megatron_hpt.training.hf_weights import gather_stage_full_layout

    main_grads = {n: p.main_grad.clone() for n, p in policy.module.named_parameters()}
    full = gather_stage_full_layout(policy.module, st, main_grads)
    return full if st.dp_rank == 0 and st.tp_rank == 0 else {}


def verl_step_grads(hf_dir: str, verl_ranks: int, mini_batch_prompts: int, verl_budget: int):
    """Each mini-batch's finalized gradients from backward_minibatch with normalization verl."""
    from megatron_hpt.training.minibatch_plan import plan_minibatches

    st, policy = _policy(hf_dir, 1, 1, PHYSICAL_BUDGET)
    rows = mixed_rows()
    every = list(range(len(rows)))
    old = {i: v[0] for i, v in policy.forward_logprobs(rows, every, temperature=1.0).items()}
    plans = plan_minibatches(rows, mini_batch_size=mini_batch_prompts, rows_per_prompt=GROUP, num_minibatches=1,
                             epochs=1, dp_size=st.dp_size, dp_rank=st.dp_rank, verl_num_ranks=verl_ranks,
                             max_tokens=verl_budget)
    out = []
    for plan in plans:
        policy.backward_minibatch(rows, plan.rows, plan.local, _loss_config(), temperature=1.0, old_logp=old,
                                  constant_normalizer=RESPONSE_LENGTH, verl=plan.verl)
        out.append({"grads": _main_grads(policy, st), "num_verl_microbatches": len(plan.verl.pieces)})
    return out


def official_step_grads(hf_dir: str, verl_ranks: int, mini_batch_prompts: int, verl_budget: int):
    """The same mini-batches as the official code aggregates them, on one rank: every official
    micro-batch's loss through the model, summed and divided by the ranks, one backward."""
    from megatron_hpt.training.batching import build_microbatch
    from megatron_hpt.training.logprobs import vocab_parallel_logprobs

    st, policy = _policy(hf_dir, 1, 1, 4096)
    rows = mixed_rows()
    every = list(range(len(rows)))
    old = policy.forward_logprobs(rows, every, temperature=1.0)

    def aligned(values):  # [rows, RESPONSE_LENGTH], response-aligned and zero-padded
        return torch.stack([torch.nn.functional.pad(v, (0, RESPONSE_LENGTH - v.numel())) for v in values])

    old_BR = aligned([old[i][0] for i in every])
    mask_BR = aligned([torch.ones(len(r.response_ids)) for r in rows])
    adv_BR = torch.tensor([r.advantage for r in rows])[:, None] * mask_BR
    is_demo = torch.tensor([r.kind == "sft" for r in rows])
    split = official_split([r.num_tokens for r in rows], is_demo.tolist(), world_size=verl_ranks,
                           ppo_mini_batch_size=mini_batch_prompts * GROUP // verl_ranks,
                           ppo_max_token_len_per_gpu=verl_budget)
    out = []
    for minibatch in split:
        policy.ddp.zero_grad_buffer()
        mb = build_microbatch(rows, every)
        logits = policy.module(mb.tokens, mb.position_ids, None)
        logp, entropy = vocab_parallel_logprobs(logits, mb.targets, tp_group=st.tp_group, temperature=1.0)
        tensors = (aligned(mb.response_values(logp)), aligned(mb.response_values(entropy)), old_BR, adv_BR, mask_BR,
                   is_demo)
        objective = official_minibatch_objective(
            minibatch, verl_ranks,
            lambda *t: hpt_microbatch_loss(*t, sft_loss_coef=SFT_COEF, entropy_coeff=ENTROPY), tensors,
        )
        objective.backward()
        out.append({"grads": _main_grads(policy, st),
                    "num_verl_microbatches": sum(len(rank) for rank in minibatch)})
    return out
