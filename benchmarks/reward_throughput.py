"""Reward throughput: RewardPool (2 worker processes) vs serial in-process scoring,
on a mix of responses like a training step's: mostly quick integer answers,
LaTeX forms that need sympy, slow symbolic comparisons (0.05-0.3 s each) and a
few pathological answers that run into the per-item timeout.

    python benchmarks/reward_throughput.py [--quick]

Both sides score the same items with the same timeout; results must agree. The
pool's one-time start (fork server + workers) is reported on its own.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_hpt.rewards import RewardItem, RewardPool  # noqa: E402

FAST = [("So the answer is \\boxed{%d}." % i, str(i if i % 3 else i + 1)) for i in range(40)]
LATEX = [
    ("\\boxed{\\frac{1}{2}}", "0.5"),
    ("\\boxed{\\{1, 2, 3\\}}", "\\{3,2,1\\}"),
    ("\\boxed{(0, 1]}", "(0,1]"),
    ("\\boxed{2\\sqrt{3}}", "\\sqrt{12}"),
    ("\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}", "(3,\\frac{\\pi}{2})"),
    ("\\boxed{(-\\infty, 2) \\cup (3, \\infty)}", "(-\\infty,2)\\cup(3,\\infty)"),
]
SLOW = [
    ("\\boxed{\\frac{x^3-1}{x-1}}", "x^2+x+1"),
    ("\\boxed{(x+1)^{10}}", "x^{10}+10x^9+45x^8+120x^7+210x^6+252x^5+210x^4+120x^3+45x^2+10x+1"),
    ("\\boxed{\\int_0^1 x^2 dx}", "\\frac{1}{3}"),
    ("\\boxed{e^{i\\pi}}", "-1"),
]
PATHOLOGICAL = [("\\boxed{9^{9^{9^{9}}}}", "5"), ("\\boxed{10^{10^{10}}}", "7")]


def make_items(quick: bool) -> list[RewardItem]:
    """Per 100 items: 80 fast, 12 LaTeX, 8 slow; plus 1 (quick) or 2 pathological ones."""
    repeats = 1 if quick else 4
    items = []
    for r in range(repeats):
        items += [RewardItem(resp, gold) for resp, gold in FAST * 2]
        items += [RewardItem(resp, gold) for resp, gold in LATEX * 2]
        items += [RewardItem(resp, gold) for resp, gold in SLOW * 2]
    items += [RewardItem(resp, gold) for resp, gold in PATHOLOGICAL[: 1 if quick else 2]]
    random.Random(0).shuffle(items)  # spread the slow items through the batch, the same way every run
    return items


def run(quick: bool = False) -> dict:
    timeout_s = 1.0
    items = make_items(quick)
    serial_pool = RewardPool(num_workers=0, timeout_s=timeout_s)
    serial_pool.score_batch(items[:5])  # import and warm math-verify like the pool's workers
    start = time.perf_counter()
    serial = serial_pool.score_batch(items)
    serial_s = time.perf_counter() - start

    start = time.perf_counter()
    pool = RewardPool(num_workers=2, timeout_s=timeout_s)
    pool.score_batch(items[:5])
    startup_s = time.perf_counter() - start
    try:
        start = time.perf_counter()
        pooled = pool.score_batch(items)
        pool_s = time.perf_counter() - start
    finally:
        pool.close()
    if pooled != serial:
        mismatches = [i for i, (a, b) in enumerate(zip(pooled, serial)) if a != b]
        raise AssertionError(f"pool and serial scoring disagree on items {mismatches[:10]}")
    return {
        "num_items": len(items),
        "num_timeouts": sum(r.reason == "timeout" for r in serial),
        "timeout_s": timeout_s,
        "serial_items_per_s": round(len(items) / serial_s, 1),
        "pool2_items_per_s": round(len(items) / pool_s, 1),
        "pool_vs_serial": round(serial_s / pool_s, 2),
        "pool_startup_s": round(startup_s, 2),
        "cpu_count": os.cpu_count(),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    figures = run(quick=parser.parse_args().quick)
    print(json.dumps(figures, indent=2))
    print(f"pool (2 workers) vs serial: {figures['pool_vs_serial']}x items/s")
