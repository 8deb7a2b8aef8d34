"""Reduction of the estimator's per-micro-batch metrics to one value per step.

The estimator reports each metric as a contribution (already divided by the
global normalizer), so a step's value is the sum over micro-batches and
data-parallel ranks; keys in ``MAX_METRICS`` take the max. Metrics live on the
last pipeline stage and are broadcast to every stage so any rank can log them.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_hpt.losses import MAX_METRICS
from megatron_hpt.parallel import ParallelState, collective_device


def reduce_step_metrics(losses: list[dict[str, torch.Tensor]], st: ParallelState) -> dict[str, float]:
    """Sum (or max) the metric dicts of every micro-batch over micro-batches and DP ranks."""
    values: dict[str, float] = {}
    for item in losses or []:
        for key, v in item.items():
            x = float(v)
            if key in MAX_METRICS:
                values[key] = max(values.get(key, float("-inf")), x)
            else:
                values[key] = values.get(key, 0.0) + x
    if st.is_last_stage and st.dp_size > 1:
        # Every DP rank must reduce the same keys in the same order: the union of all ranks' keys.
        gathered: list = [None] * st.dp_size
        dist.all_gather_object(gathered, sorted(values), group=st.dp_group)
        keys = sorted(set().union(*gathered))
        device = collective_device(st.dp_group)
        sums = torch.tensor([values.get(k, 0.0) for k in keys if k not in MAX_METRICS], dtype=torch.float64, device=device)
        maxes = torch.tensor([values.get(k, float("-inf")) for k in keys if k in MAX_METRICS], dtype=torch.float64,
                             device=device)
        dist.all_reduce(sums, group=st.dp_group)
        if maxes.numel():
            dist.all_reduce(maxes, op=dist.ReduceOp.MAX, group=st.dp_group)
        s_keys = [k for k in keys if k not in MAX_METRICS]
        m_keys = [k for k in keys if k in MAX_METRICS]
        values = dict(zip(s_keys, sums.tolist())) | dict(zip(m_keys, maxes.tolist()))
    if st.pp_size > 1:
        from megatron.core import parallel_state as mps

        buf = [values]
        dist.broadcast_object_list(buf, src=mps.get_pipeline_model_parallel_last_rank(), group=st.pp_group)
        values = buf[0]
    return values
