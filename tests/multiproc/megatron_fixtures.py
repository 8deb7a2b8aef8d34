"""Rank functions shared by the multi-rank megatron tests (module-level so spawn can import them)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist


def full_layout_of(hf_dir: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    from megatron_hpt.models import load_hf_config
    from megatron_hpt.models.weights import hf_to_full_layout

    hf = load_hf_config(hf_dir)
    tensors = {}
    for f in sorted(Path(hf_dir).glob("*.safetensors")):
        tensors.update(load_file(f))
    return dict(hf_to_full_layout(hf, tensors.__getitem__))


def build_loaded_model(hf_dir: str, tp: int, pp: int, **overrides):
    from megatron_hpt.models import ModelConfig, build_gpt_model, load_hf_config
    from megatron_hpt.models.weights import load_full_layout
    from megatron_hpt.parallel import ParallelConfig, init_parallel

    st = init_parallel(ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp))
    hf = load_hf_config(hf_dir)
    model = build_gpt_model(hf, ModelConfig(hf_path=hf_dir), tp=tp, pp=pp, pp_rank=st.pp_rank, **overrides)
    full = full_layout_of(hf_dir)
    load_full_layout(model, full.__getitem__, tp_rank=st.tp_rank, tp_size=tp, pp_rank=st.pp_rank)
    return st, model


def gather_full(st, model, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Full-layout (global names, TP-merged) copies of this stage's tensors."""
    from megatron_hpt.models.weights import layer_offset, local_to_global, role_of, tp_merge

    offset = layer_offset(model, st.pp_rank)
    out = {}
    for name, t in tensors.items():
        global_name, role = role_of(local_to_global(name, offset))
        shards = [torch.empty_like(t) for _ in range(st.tp_size)]
        dist.all_gather(shards, t.contiguous(), group=st.tp_group)
        out[global_name] = tp_merge(shards, role)
    return out


def lm_batches(vocab: int, num_microbatches: int, batch: int, seq: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (batch, seq + 1), generator=g) for _ in range(num_microbatches)]


def lm_forward_step(batch_iter, model):
    """forward_step for the schedules: next-token cross-entropy summed over tokens."""
    tokens = next(batch_iter)
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    pos = torch.arange(inputs.shape[1]).unsqueeze(0).expand_as(inputs)
    out = model(inputs, pos, None, labels=labels)

    def loss_func(per_token_loss):
        n = torch.tensor(per_token_loss.numel(), dtype=torch.int)
        total = per_token_loss.float().sum()
        return total, n, {"lm_loss": torch.stack([total.detach(), n.float()])}

    return out, loss_func


def loss_and_grads(hf_dir: str, tp: int, pp: int, num_microbatches: int):
    """Per-token LM loss and full-layout gradients of one forward_backward call."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    st, model = build_loaded_model(hf_dir, tp, pp)
    batches = lm_batches(model.config.hidden_size and 512, num_microbatches, 2, 24)
    seq = batches[0].shape[1] - 1
    losses = get_forward_backward_func()(
        forward_step_func=lm_forward_step,
        data_iterator=iter(batches),
        model=[model],
        num_microbatches=num_microbatches,
        seq_length=seq,
        micro_batch_size=2,
        forward_only=False,
    )
    grads = gather_full(st, model, {n: p.grad for n, p in model.named_parameters()})
    loss = None
    if st.is_last_stage:
        total = torch.stack([x["lm_loss"] for x in losses]).sum(0)
        loss = (total[0] / total[1]).item()
    return {"rank": st.rank, "loss": loss, "grads": grads if st.tp_rank == 0 else {}}


def optimizer_step(hf_dir: str, tp: int, use_distributed_optimizer: bool, dp_split: bool):
    """One Adam step through Megatron DDP + get_megatron_optimizer (clip 1.0);
    returns the updated full-layout weights."""
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func

    st, model = build_loaded_model(hf_dir, tp, 1)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=use_distributed_optimizer
    )
    ddp = DistributedDataParallel(model.config, ddp_config, model)
    # The schedule all-reduces DP grads and divides by the global token count here.
    model.config.finalize_model_grads_func = finalize_model_grads
    model.config.no_sync_func = ddp.no_sync
    opt = get_megatron_optimizer(
        OptimizerConfig(
            # adam_eps well above fp32 rounding of the grads: Adam's first step is
            # ~lr*sign(g), which flips on rounding noise for grads near zero.
            optimizer="adam", lr=1e-2, adam_eps=1e-4, weight_decay=0.01, clip_grad=1.0, bf16=False,
            use_distributed_optimizer=use_distributed_optimizer,
        ),
        [ddp],
    )
    batches = lm_batches(512, 4, 2, 16)
    if dp_split:  # each data-parallel rank takes its half of the same global batch
        batches = batches[st.dp_rank :: st.dp_size]
    ddp.zero_grad_buffer()
    opt.zero_grad()
    get_forward_backward_func()(
        forward_step_func=lm_forward_step,
        data_iterator=iter(batches),
        model=[ddp],
        num_microbatches=len(batches),
        seq_length=16,
        micro_batch_size=2,
        forward_only=False,
    )
    ok, grad_norm, _ = opt.step()
    weights = gather_full(st, model, {n: p.detach() for n, p in model.named_parameters()})
    return {"ok": ok, "grad_norm": grad_norm, "weights": weights if st.rank == 0 else {}}
