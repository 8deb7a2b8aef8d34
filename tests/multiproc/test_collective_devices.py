"""The project's collectives hand tensors on the group's device (NCCL's on GPUs), checked at
two ranks by the collective-device check that every multi-rank test runs under."""

from __future__ import annotations

from megatron_hpt.parallel.launch import run_ranks
from tests.multiproc.collective_fixtures import project_collectives


def test_stop_agreement_metrics_and_optimizer_flag_at_dp2():
    results = run_ranks(project_collectives, 2, timeout_s=300)
    for r in results:
        assert r["check_installed"] and r["simulating"]
        assert r["stop_before"] is False and r["stop_after"] is True  # rank 1's signal stops both
        assert r["metrics"] == {"loss/pg": 0.25 + 0.5 + 0.5 + 0.5, "ratio/max": 2.0}
        assert r["optimizer_has_state"] is True
