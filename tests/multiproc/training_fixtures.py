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


def long_tailed_rows(seed: int = 0, vocab: int = 480) -> list[TrainRow]:
    """A mixed SFT + RL mini-batch with long-tailed lengths (HPT's shape, scaled down): 2
    prompts switched to SFT with long demonstrations, 4 RL groups of 3 rollouts whose
    response lengths are log-normal (a few long ones among many short ones)."""
    rng = random.Random(seed)

    def ids(n):
        return [rng.randrange(3, vocab) for _ in range(n)]

    rows = []
    for g in range(6):
        prompt = ids(rng.randint(5, 40))
        if g in (1, 4):
            rows.append(TrainRow(prompt_ids=prompt, response_ids=ids(rng.randint(150, 300)), kind="sft", group=g))
            continue
        rewards = [1.0, 0.0, rng.choice([0.0, 1.0])]
        mean = sum(rewards) / 3
        for r in rewards:
            n = min(300, max(2, int(rng.lognormvariate(3.0, 1.0))))
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


def _policy(hf_dir: str, tp: int, pp: int, max_tokens: int, lr: float = 1e-3, skip_above: float = 80.0,
            packing: str = "padded"):
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
        packing=packing,
    )
    policy = MegatronPolicy(hf, ModelConfig(hf_path=hf_dir), step_cfg, st, total_optimizer_steps=10)
    load_hf_weights(policy.module, st, hf, hf_dir)
    return st, policy


def hpt_grads(hf_dir: str, tp: int, pp: int, max_tokens: int, preset: str = "hpt"):
    """Loss and full-layout gradients of one mixed SFT+RL mini-batch, with old log-probs
    from the forward-only path."""
    from megatron_hpt.losses import get_preset
    from megatron_hpt.training.hf_weights import gather_stage_full_layout
    from megatron_hpt.training.policy import broadcast_from_last_stage

    st, policy = _policy(hf_dir, tp, pp, max_tokens)
    rows = mixed_rows()
    local = policy.local_rows(rows, range(len(rows)))
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


def layout_run(hf_dir: str, tp: int, pp: int, max_tokens: int, packing: str):
    """Per-row log-probs and entropy (forward-only), loss metrics and full-layout gradients
    (training step, HPT preset with an entropy bonus) of the long-tailed mixed batch, in the
    given micro-batch layout; also the micro-batch shapes this rank ran."""
    from megatron_hpt.losses import get_preset
    from megatron_hpt.training.hf_weights import gather_stage_full_layout
    from megatron_hpt.training.policy import broadcast_from_last_stage

    st, policy = _policy(hf_dir, tp, pp, max_tokens, packing=packing)
    rows = long_tailed_rows()
    local = policy.local_rows(rows, range(len(rows)))
    forward = policy.forward_logprobs(rows, local, temperature=0.9, with_entropy=True)
    forward = broadcast_from_last_stage(forward, st)
    shapes = [tuple(mb.tokens.shape) for mb in policy._microbatches(rows, local)]
    loss_cfg = replace(get_preset("hpt"), entropy_coef=0.01)
    old = {i: lp - 0.05 * ent for i, (lp, ent) in forward.items()}  # ratios away from 1
    metrics = policy.backward_minibatch(rows, range(len(rows)), local, loss_cfg, temperature=0.9, old_logp=old)
    grads = {}
    if st.dp_rank == 0:
        full = gather_stage_full_layout(policy.module, st, {n: p.main_grad for n, p in policy.module.named_parameters()})
        grads = full if st.tp_rank == 0 else {}
    return {"forward": forward, "metrics": metrics, "grads": grads, "shapes": shapes, "local": local,
            "layout": policy.cost_model.layout}


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


def packed_logits_and_hf(hf_dir: str, lengths: list[int], pad_to_multiple: int):
    """Logits of rows of the given lengths packed into one sequence (megatron's THD path,
    the local attention), unpacked per row, and HF transformers' logits of each row alone."""
    from transformers import AutoModelForCausalLM

    from megatron_hpt.training.batching import build_microbatch
    from megatron_hpt.training.forward import _model_forward
    from tests.multiproc.megatron_fixtures import build_loaded_model

    st, model = build_loaded_model(hf_dir, 1, 1)
    rng = random.Random(sum(lengths))
    seqs = [[rng.randrange(3, 500) for _ in range(n + 1)] for n in lengths]
    rows = [TrainRow(prompt_ids=s[:1], response_ids=s[1:], kind="sft") for s in seqs]
    mb = build_microbatch(rows, list(range(len(rows))), layout="packed", pad_to_multiple=pad_to_multiple)
    model.eval()
    with torch.no_grad():
        logits = _model_forward(model, mb)[0]  # [S, V]
        hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
        ref = [hf(torch.tensor([s[:-1]])).logits[0] for s in seqs]
    ours = [logits[mb.packed.index[b, :n]] for b, n in enumerate(lengths)]
    return ours, ref, tuple(mb.tokens.shape)
