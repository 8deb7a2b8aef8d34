"""The forward steps handed to megatron's ``forward_backward_func``: forward-only
log-probs (policy, old policy, reference) and the training step's loss.

Loss scaling contract (why ``loss * total_loss_tokens``): with
``calculate_per_token_loss`` megatron sums what each micro-batch's loss function
returns, all-reduces the returned token counts over data-parallel ranks, and
divides the gradients by that total. The estimator already returns each
micro-batch's contribution to the globally normalized objective, so multiplying it
by the global loss-token count makes megatron's division cancel out: gradients are
exactly those of the objective, however the batch is split into micro-batches,
data-parallel ranks and pipeline stages.
"""

from __future__ import annotations

from typing import Iterable

import torch

from megatron_hpt.losses import LossConfig, LossInputs, LossNormalizers, unified_loss
from megatron_hpt.training.batching import MicroBatch
from megatron_hpt.training.logprobs import vocab_parallel_logprobs

NONFINITE_KEY = "train/nonfinite_logp_tokens"
"""Metric: loss tokens whose log-prob was NaN/inf in a step (the step is then skipped)."""


def run_schedule(model, microbatches: list[MicroBatch], forward_step, *, forward_only: bool):
    """One megatron ``forward_backward_func`` call over the given micro-batches."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    if not microbatches:
        return []
    return get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter(microbatches),
        model=[model],
        num_microbatches=len(microbatches),
        seq_length=max(mb.tokens.shape[1] for mb in microbatches),
        micro_batch_size=max(mb.tokens.shape[0] for mb in microbatches),
        forward_only=forward_only,
    )


def _model_forward(model, mb: MicroBatch):
    """The model on a micro-batch in its layout: packed rows go in as one sequence with
    megatron's THD parameters (attention and RoPE restart at each row)."""
    if mb.packed is None:
        return model(mb.tokens, mb.position_ids, None)
    from megatron.core.packed_seq_params import PackedSeqParams

    cu = mb.packed.cu_seqlens
    params = PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=cu,
        cu_seqlens_kv=cu,
        max_seqlen_q=mb.packed.max_seqlen,
        max_seqlen_kv=mb.packed.max_seqlen,
    )
    return model(mb.tokens, mb.position_ids, None, packed_seq_params=params)


def _logprobs_by_row(logits, mb: MicroBatch, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs and entropy [B, T] in the row layout, whatever the micro-batch's layout."""
    logp, entropy = vocab_parallel_logprobs(logits, mb.targets, **kwargs)
    return mb.unpack(logp), mb.unpack(entropy)


def logprob_forward_step(
    *,
    tp_group,
    temperature: float,
    chunk_rows: int | None,
    with_entropy: bool,
    sink: list,
    device: torch.device,
):
    """A forward step that records (micro-batch, log-probs [B, T], entropy [B, T] | None),
    in the row layout, in ``sink`` on the last pipeline stage."""

    def forward_step(data_iterator: Iterable[MicroBatch], model):
        mb = next(data_iterator).to(device)
        output = _model_forward(model, mb)

        def loss_func(logits):
            # Logits leave the model in its own dtype; the log-softmax accumulates in fp32.
            logp, entropy = _logprobs_by_row(
                logits, mb, tp_group=tp_group, temperature=temperature, chunk_rows=chunk_rows
            )
            sink.append((mb, logp.float().cpu(), entropy.float().cpu() if with_entropy else None))
            return torch.zeros((), device=logits.device), {}

        return output, loss_func

    return forward_step


def train_forward_step(
    *,
    loss_config: LossConfig,
    normalizers: LossNormalizers,
    total_loss_tokens: int,
    tp_group,
    temperature: float,
    chunk_rows: int | None,
    device: torch.device,
    old_from_current: bool = False,
):
    """A forward step whose loss is the unified estimator on the micro-batch's rows.
    ``old_from_current``: the weights have not moved since the rollout (first mini-batch),
    so the old policy's log-probs are the current ones, detached."""

    needs_entropy = loss_config.entropy_coef != 0.0 or loss_config.entropy_aware_weights is not None

    def forward_step(data_iterator: Iterable[MicroBatch], model):
        mb = next(data_iterator).to(device)
        output = _model_forward(model, mb)

        def loss_func(logits):
            logp, entropy = _logprobs_by_row(
                logits, mb, tp_group=tp_group, temperature=temperature, chunk_rows=chunk_rows
            )
            bad = int((~torch.isfinite(logp.detach()) & (mb.loss_mask.to(logp.device) != 0)).sum())
            num_tokens = torch.tensor(mb.num_loss_tokens, dtype=torch.int, device=logits.device)
            if bad:
                # A diverged model (NaN/inf log-probs) must not crash the run: no loss from this
                # micro-batch, and the flag makes the policy skip the optimizer step.
                return (logp.nan_to_num(0.0, 0.0, 0.0) * 0).sum(), num_tokens, {NONFINITE_KEY: torch.tensor(float(bad))}
            inputs = LossInputs(
                logp=logp,
                mask=mb.loss_mask,
                advantages=mb.advantages,
                entropy=entropy if needs_entropy else entropy.detach(),
                old_logp=logp.detach() if old_from_current else mb.old_logp,
                ref_logp=mb.ref_logp,
                rollout_logp=mb.rollout_logp,
                is_sft=mb.is_sft,
                off_policy=mb.off_policy,
                row_weight=mb.row_weight,
            )
            loss, metrics = unified_loss(loss_config, inputs, normalizers, mb.term_normalizers)
            reported = {k: v.detach().float() for k, v in metrics.items()}
            return loss * total_loss_tokens, num_tokens, reported

        return output, loss_func

    return forward_step
