"""Full-vocabulary logits of a small batch through megatron's real pipeline
schedule, gathered over tensor-parallel ranks.

For checking a model against HF transformers (conversion verification, tests).
Training never materializes full logits: it computes log-probs vocab-parallel
and chunked (``megatron_hpt.training``).
"""

from __future__ import annotations

import torch


@torch.no_grad()
def forward_logits(model, tokens: torch.Tensor, pstate) -> torch.Tensor | None:
    """fp32 logits ``[batch, seq, vocab]`` of ``tokens`` (``[batch, seq]`` ids) on
    the ranks of the last pipeline stage; None on the other stages.

    Collective over the model-parallel ranks of ``pstate`` (a ParallelState)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    model.eval()
    batch, seq = tokens.shape
    tokens = tokens.to(pstate.device)
    position_ids = torch.arange(seq, device=pstate.device).unsqueeze(0).expand(batch, seq)
    captured: list[torch.Tensor] = []

    def loss_func(output_tensor):
        captured.append(output_tensor.detach())
        # (loss, num_tokens, logged) is the contract when calculate_per_token_loss is set.
        return output_tensor.sum() * 0.0, torch.tensor(1, device=output_tensor.device), {}

    def forward_step(data_iterator, step_model):
        ids = next(data_iterator)
        return step_model(ids, position_ids, attention_mask=None), loss_func

    get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter([tokens]),
        model=[model],
        num_microbatches=1,
        seq_length=seq,
        micro_batch_size=batch,
        forward_only=True,
    )
    if not pstate.is_last_stage:
        return None
    local = captured[0].float()  # [batch, seq, vocab / tp]: the output layer is vocab-parallel
    if pstate.tp_size == 1:
        return local.cpu()
    parts = [torch.empty_like(local) for _ in range(pstate.tp_size)]
    torch.distributed.all_gather(parts, local.contiguous(), group=pstate.tp_group)
    return torch.cat(parts, dim=-1).cpu()
