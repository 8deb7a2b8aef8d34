"""Scorers that misbehave on purpose, for the reward-pool tests (workers import
this module by name, so it lives beside the tests rather than inside them)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from megatron_hpt.rewards.scoring import RewardItem, RewardResult, score_item


def faulty_scorer(item: RewardItem, timeout_s: float | None) -> RewardResult:
    if item.response == "CRASH_ALWAYS":
        os._exit(3)  # the worker dies without a word, as on a segfault or an OOM kill
    if item.response.startswith("CRASH_ONCE:"):
        marker = Path(item.response.split(":", 1)[1])
        if not marker.exists():
            marker.touch()
            os._exit(3)
        return RewardResult(1.0, "", "recovered")
    if item.response == "HANG_IN_C":
        # Stuck where no signal reaches it (like a long GMP computation): only a kill helps.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
        time.sleep(120)
    if item.response == "RAISE":
        raise RuntimeError("scorer bug")
    return score_item(item, timeout_s)
