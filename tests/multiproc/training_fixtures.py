"""Rank functions for the training-step tests: a mixed SFT + RL batch through
MegatronPolicy at any TP/PP/DP layout, returning full-layout gradients."""

from __future__ import annotations

import random
from dataclasses import replace

import torch

from megatron_hpt.data.types import TrainRow


def mixed_rows(seed: int = 0, vocab: int = 480) -> list[TrainRow]:
    """4 prompts: 2 switched to SFT (one demonstration row each), 2 kept as RL groups of
    3 rollouts with advantages r - mean and rollout log-probs; lengths vary."""
    rng = random.Random(seed)

    def ids(n):
        return [rng.randrange(3, vocab) for _ in range(n)]

    rows = []
    for g in range(4):
        prompt = ids(rng.randint(4, 12))
        if g % 2 == 0:
            rows.append(TrainRow(prompt_ids=prompt, response_ids=ids(rng.randint(6, 20)), kind="sft", group=g))
        else:
            rewards = [1.0, 0.0, rng.choice([0.0, 1.0])]
            mean = sum(rewards) / 3
            for r in rewards:
                n = rng.randint(3, 24)
                rows.append(
                    TrainRow(
                        prompt_ids=prompt,
                        response_ids=ids(n),
                        kind="rl",
                        advantage=r - mean,
                        group=g,
                        rollout_logprobs=[-rng.uniform(4.0, 8.0) for _ in range(n)],
                    )
                )
    return rows


def _policy(hf_dir: str, tp: int, pp: int, max_tokens: int, lr: float = 1e-3, skip_above: float = 80.0):
    from megatron_hpt.models import ModelConfig, load_hf_config
    from megatron_hpt.parallel import ParallelConfig, init_parallel
    from megatron_hpt.training.config import OptimizerSettings, TrainStepConfig
    from megatron_hpt.training.hf_weights import load_hf_weights
    from megatron_hpt.training.policy import MegatronPolicy

    st = init_parallel(ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp))
    hf = load_hf_config(hf_dir)
    step_cfg = TrainStepConfig(
        optimizer=OptimizerSettings(lr=lr, skip_grad_norm_above=skip_above),
        max_tokens_per_microbatch=max_tokens,
        packing="padded",
    )
    policy = MegatronPolicy(hf, ModelConfig(hf_path=hf_dir), step_cfg, st, total_optimizer_steps=10)
    load_hf_weights(policy.module, st, hf, hf_dir)
    return st, policy


def _local_rows(st, rows):
    from megatron_hpt.training.batching import balanced_split
    from megatron_hpt.training.policy import row_lengths

    return balanced_split(row_lengths(rows), range(len(rows)), st.dp_size)[st.dp_rank]


def hpt_grads(hf_dir: str, tp: int, pp: int, max_tokens: int, preset: str = "hpt"):
    """Loss and full-layout gradients of one mixed SFT+RL mini-batch, with old log-probs
    from the forward-only path."""
    from megatron_hpt.losses import get_preset
    from megatron_hpt.training.hf_weights import gather_stage_full_layout
    from megatron_hpt.training.policy import broadcast_from_last_stage

    st, policy = _policy(hf_dir, tp, pp, max_tokens)
    rows = mixed_rows()
    local = _local_rows(st, rows)
    loss_cfg = replace(get_preset(preset), entropy_coef=0.01)
    old = policy.forward_logprobs(rows, local, temperature=1.0)
    metrics = policy.backward_minibatch(
        rows, range(len(rows)), local, loss_cfg, temperature=1.0,
        old_logp={i: v[0] for i, v in old.items()},
    )
    grads = {}
    main_grads = {n: p.main_grad for n, p in policy.module.named_parameters()}
    if st.dp_rank == 0:
        full = gather_stage_full_layout(policy.module, st, main_grads)
        grads = full if st.tp_rank == 0 else {}
    old_all = broadcast_from_last_stage({i: v[0] for i, v in old.items()}, st)
    return {"metrics": metrics, "grads": grads, "old": old_all, "rank": st.rank}


def step0_ratio(hf_dir: str):
    """Old log-probs from the forward-only path vs the log-probs recomputed in the step."""
    from megatron_hpt.losses import get_preset

    st, policy = _policy(hf_dir, 1, 1, 4096)
    rows = mixed_rows(seed=3)
    idx = list(range(len(rows)))
    old = policy.forward_logprobs(rows, idx, temperature=1.0)
    metrics = policy.backward_minibatch(
        rows, idx, idx, get_preset("hpt"), temperature=1.0, old_logp={i: v[0] for i, v in old.items()}
    )
    return metrics


def skip_step(hf_dir: str, skip_above: float):
    """One train_minibatch with the given skip threshold: did the weights change?"""
    from megatron_hpt.losses import get_preset

    st, policy = _policy(hf_dir, 1, 1, 4096, lr=1e-2, skip_above=skip_above)
    rows = mixed_rows(seed=5)
    idx = list(range(len(rows)))
    before = {n: p.detach().clone() for n, p in policy.module.named_parameters()}
    old = policy.forward_logprobs(rows, idx, temperature=1.0)
    result, metrics = policy.train_minibatch(
        rows, idx, idx, get_preset("hpt"), temperature=1.0, old_logp={i: v[0] for i, v in old.items()}
    )
    changed = any(not torch.equal(before[n], p.detach()) for n, p in policy.module.named_parameters())
    return {"result": result, "metrics": metrics, "changed": changed, "skipped_steps": policy.skipped_steps}


def checkpoint_survives_a_failed_save(hf_dir: str, root: str):
    """Save at step 1, train, then a save at step 2 that dies half-way (after the weights,
    before the trainer state): the latest checkpoint is still step 1 and loads exactly."""
    import megatron_hpt.training.checkpoint as ckpt
    from megatron_hpt.losses import get_preset

    st, policy = _policy(hf_dir, 1, 1, 4096, lr=1e-2)
    rows = mixed_rows(seed=7)
    idx = list(range(len(rows)))
    ckpt.save_checkpoint(root, 1, policy, st, {"sampler": {"position": 1}}, hf_dir=hf_dir)
    saved = {n: p.detach().clone() for n, p in policy.module.named_parameters()}
    policy.train_minibatch(rows, idx, idx, get_preset("hpt"), temperature=1.0, old_from_current=True)
    moved = any(not torch.equal(saved[n], p) for n, p in policy.module.named_parameters())

    real_save = torch.save

    def dying_save(obj, path, *a, **k):
        if str(path).endswith("trainer_state.pt"):
            raise KeyboardInterrupt("killed during the checkpoint write")
        return real_save(obj, path, *a, **k)

    ckpt.torch.save = dying_save
    try:
        ckpt.save_checkpoint(root, 2, policy, st, {"sampler": {"position": 2}}, hf_dir=hf_dir)
        died = False
    except KeyboardInterrupt:
        died = True
    finally:
        ckpt.torch.save = real_save
    latest = ckpt.latest_checkpoint(root)
    state = ckpt.load_checkpoint(latest, policy, st)
    restored = all(torch.equal(saved[n], p) for n, p in policy.module.named_parameters())
    # the next good save cleans the partial one up
    ckpt.save_checkpoint(root, 3, policy, st, {}, hf_dir=hf_dir)
    import os

    return {"died": died, "moved": moved, "latest": latest.name, "state": state, "restored": restored,
            "after": sorted(os.listdir(root))}
