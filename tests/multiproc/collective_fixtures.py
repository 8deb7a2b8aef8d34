"""Rank function of the collective-device test: the project's own small collectives (the
loop's stop agreement, the step-metrics reduction, the optimizer-state flag) at DP=2 with
the collective-device check installed (tests/conftest.py asks init_parallel for it)."""

from __future__ import annotations

import os
import signal
import types

import torch


def project_collectives():
    from megatron_hpt.parallel import ParallelConfig, init_parallel
    from megatron_hpt.parallel import collectives
    from megatron_hpt.trainer.loop import StopRequested
    from megatron_hpt.training.checkpoint import optimizer_has_state
    from megatron_hpt.training.metrics import reduce_step_metrics

    st = init_parallel(ParallelConfig())
    out = {"check_installed": collectives.check_installed(), "simulating": collectives.simulating()}
    stop = StopRequested()
    out["stop_before"] = stop.agreed()
    if st.rank == 1:
        os.kill(os.getpid(), signal.SIGTERM)  # pre-emption reaches one rank only
    out["stop_after"] = stop.agreed()
    # two micro-batches per rank; "ratio/max" is reduced with max, the others summed
    losses = [{"loss/pg": torch.tensor(0.25 * (st.rank + 1)), "ratio/max": torch.tensor(1.0 + st.rank)},
              {"loss/pg": torch.tensor(0.5), "ratio/max": torch.tensor(0.5)}]
    out["metrics"] = reduce_step_metrics(losses, st)
    # only rank 0's optimizer has taken a step
    sub = types.SimpleNamespace(optimizer=types.SimpleNamespace(state={"p": {}} if st.rank == 0 else {}))
    out["optimizer_has_state"] = optimizer_has_state(sub)
    return out
