"""Run a function on N real ranks on this machine (torch.multiprocessing, gloo).

Used by the multi-rank tests and by CPU runs that emulate TP/PP/DP layouts
without torchrun: each rank gets the torchrun environment variables, runs
``fn(*args)``, and its return value comes back to the caller, in rank order.
"""

from __future__ import annotations

import os
import pickle
import queue as queue_mod
import socket
import time
import traceback
from typing import Any, Callable

import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port on loopback that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, threads, fn, args, queue):
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    import warnings

    warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\..*")
    warnings.filterwarnings("ignore", category=FutureWarning)
    import torch

    torch.set_num_threads(threads)
    try:
        # Plain pickle copies tensor data; the queue's own pickler would pass shared
        # memory that dies with this process before the parent reads it.
        result = pickle.dumps(fn(*args))
        queue.put((rank, True, result))
    except BaseException:  # the parent re-raises it with the rank's traceback
        queue.put((rank, False, traceback.format_exc()))
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            try:
                from megatron_hpt.parallel.state import destroy_parallel

                destroy_parallel()
            except Exception:
                pass


class RankFailed(RuntimeError):
    """A rank raised; the message holds its traceback."""


def run_ranks(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout_s: float = 600.0,
    threads_per_rank: int | None = None,
) -> list[Any]:
    """Run ``fn(*args)`` on ``world_size`` processes and return their results by rank.

    ``fn`` must be importable (a module-level function). A rank that raises, dies
    or hangs past ``timeout_s`` makes this raise RankFailed with its traceback.
    """
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    threads = threads_per_rank or max(1, (os.cpu_count() or 1) // world_size)
    procs = [
        ctx.Process(target=_worker, args=(r, world_size, port, threads, fn, args, queue), daemon=False)
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors: list[str] = []
    try:
        deadline = time.monotonic() + timeout_s
        while len(results) < world_size and not errors:
            try:
                rank, ok, payload = queue.get(timeout=1.0)
            except queue_mod.Empty:
                dead = [i for i, p in enumerate(procs) if p.exitcode not in (None, 0) and i not in results]
                if dead:
                    errors.append(f"ranks {dead} died (exit codes {[procs[i].exitcode for i in dead]})")
                elif time.monotonic() > deadline:
                    errors.append(f"ranks did not finish within {timeout_s:.0f} s")
                continue
            if ok:
                results[rank] = pickle.loads(payload)
            else:
                errors.append(f"rank {rank} failed:\n{payload}")
    finally:
        for p in procs:
            p.join(timeout=5 if not errors else 1)
            if p.is_alive():
                p.kill()
                p.join()
    if errors:
        raise RankFailed("\n".join(errors))
    return [results[r] for r in range(world_size)]
