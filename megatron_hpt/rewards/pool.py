"""RewardPool: score batches of responses in worker processes, with a per-item
time limit that holds even when sympy is stuck in C code.

Each worker scores one item at a time in its main thread, so the scorer's own
signal timer works (math-verify's timeouts use signals and only work in a
process's main thread). The parent also keeps a hard deadline per item (the
limit plus a grace period): a worker past it is killed, the item scores 0 with
reason "timeout" and a fresh worker takes its place. A worker that dies on an
item is replaced; the item is retried (``max_retries``) and then scores 0 with
reason "worker_crash". Results come back in input order.

Workers come from a fork server that has already imported the scorer (sympy,
math-verify), so a replacement starts in milliseconds, and nothing is forked
from a parent that holds torch threads or process groups.
"""

from __future__ import annotations

import logging
import multiprocessing
import signal
import time
import weakref
from collections import deque
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Callable, Sequence

from megatron_hpt.config import checks
from megatron_hpt.rewards.extract import last_boxed_content
from megatron_hpt.rewards.scoring import RewardItem, RewardResult, check_style, score_item

logger = logging.getLogger(__name__)

Scorer = Callable[[RewardItem, "float | None"], RewardResult]
"""A module-level function (workers import it by name) scoring one item under a time limit."""


@dataclass(kw_only=True, frozen=True)
class RewardConfig:
    num_workers: int = 2
    """Scoring processes; 0 scores in the calling process (tests, trusted inputs)."""
    timeout_s: float = 10.0
    """Per-item limit in seconds (the paper's evaluation labels each response within 10 s)."""
    kill_grace_s: float = 0.5
    """Extra time before the parent kills a worker whose own timer did not fire."""
    max_retries: int = 1
    """Times an item is retried on a fresh worker after its worker died on it."""

    def __post_init__(self) -> None:
        checks.finite_floats(self)
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")
        if self.timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s}")
        if self.kill_grace_s < 0:
            raise ValueError(f"kill_grace_s must be >= 0, got {self.kill_grace_s}")
        if self.max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {self.max_retries}")


def _worker_main(conn: Connection, scorer: Scorer, timeout_s: float) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    conn.send(("ready", None))
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message is None:
            return
        task_id, item = message
        try:
            result = scorer(item, timeout_s)
        except Exception:
            logger.exception("reward scorer raised on item %d", task_id)
            result = RewardResult(0.0, "scorer_error", None)
        conn.send((task_id, result))


class _Worker:
    def __init__(self, ctx, scorer: Scorer, timeout_s: float) -> None:
        self.conn, child_conn = ctx.Pipe(duplex=True)
        self.process = ctx.Process(
            target=_worker_main, args=(child_conn, scorer, timeout_s), daemon=True, name="reward-worker"
        )
        self.process.start()
        child_conn.close()
        self.ready = False
        self.task: int | None = None
        self.deadline = 0.0

    def stop(self, kill: bool) -> None:
        if self.process.is_alive():
            if kill:
                self.process.kill()
            else:
                try:
                    self.conn.send(None)
                except (BrokenPipeError, OSError):
                    pass
        self.process.join(timeout=None if kill else 2.0)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.conn.close()


def _shutdown(workers: list[_Worker]) -> None:
    for worker in workers:
        worker.stop(kill=False)
    workers.clear()


def _as_item(item) -> RewardItem:
    if isinstance(item, RewardItem):
        out = item
    elif isinstance(item, (tuple, list)) and len(item) in (2, 3):
        out = RewardItem(*item)
    else:
        raise TypeError(f"a reward item is a RewardItem or (response, ground_truth[, style]), got {item!r}")
    check_style(out.style)
    return out


class RewardPool:
    """Scores batches in ``num_workers`` processes (0: in this process).

    Use as a context manager or call ``close()``; workers are daemons, so they also
    end with the parent. ``stats`` counts timeouts, kills, crashes and respawns.
    """

    def __init__(
        self,
        num_workers: int = 2,
        timeout_s: float = 10.0,
        *,
        scorer: Scorer = score_item,
        kill_grace_s: float = 0.5,
        max_retries: int = 1,
    ) -> None:
        self.config = RewardConfig(
            num_workers=num_workers, timeout_s=timeout_s, kill_grace_s=kill_grace_s, max_retries=max_retries
        )
        self.scorer = scorer
        self.stats = {"timeouts": 0, "killed": 0, "crashes": 0, "respawns": 0}
        self._workers: list[_Worker] = []
        self._ctx = None
        if num_workers > 0:
            self._ctx = multiprocessing.get_context("forkserver")
            # The fork server imports the scorer once; every worker forked from it starts warm.
            self._ctx.set_forkserver_preload(["megatron_hpt.rewards.scoring", scorer.__module__])
            self._workers = [self._spawn() for _ in range(num_workers)]
        self._finalizer = weakref.finalize(self, _shutdown, self._workers)

    @classmethod
    def from_config(cls, cfg: RewardConfig, scorer: Scorer = score_item) -> "RewardPool":
        return cls(
            cfg.num_workers, cfg.timeout_s, scorer=scorer, kill_grace_s=cfg.kill_grace_s, max_retries=cfg.max_retries
        )

    def _spawn(self) -> _Worker:
        return _Worker(self._ctx, self.scorer, self.config.timeout_s)

    def close(self) -> None:
        self._finalizer()

    def __enter__(self) -> "RewardPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def score_batch(self, items: Sequence) -> list[RewardResult]:
        """Scores in input order. Items: RewardItem or (response, ground_truth[, style])."""
        batch = [_as_item(item) for item in items]
        if self.config.num_workers == 0:
            return [self.scorer(item, self.config.timeout_s) for item in batch]
        if not self._finalizer.alive:
            raise RuntimeError("RewardPool is closed")
        return self._run(batch)

    # -- the scheduling loop -------------------------------------------------------------

    def _replace(self, worker: _Worker) -> None:
        worker.stop(kill=True)
        self._workers[self._workers.index(worker)] = self._spawn()
        self.stats["respawns"] += 1

    def _run(self, batch: list[RewardItem]) -> list[RewardResult]:
        cfg = self.config
        results: list[RewardResult | None] = [None] * len(batch)
        attempts = [0] * len(batch)
        pending = deque(range(len(batch)))
        failed_starts = 0

        def crashed(worker: _Worker) -> None:
            nonlocal failed_starts
            task = worker.task
            if task is None:
                failed_starts += 0 if worker.ready else 1
                if failed_starts > 3 * cfg.num_workers:
                    raise RuntimeError(
                        f"reward workers keep dying before they start (exit code {worker.process.exitcode}); "
                        f"check that the scorer {self.scorer.__module__}.{self.scorer.__name__} imports"
                    )
            else:
                self.stats["crashes"] += 1
                attempts[task] += 1
                if attempts[task] <= cfg.max_retries:
                    pending.appendleft(task)
                else:
                    item = batch[task]
                    logger.warning("reward worker died on item %d %d times; scoring it 0", task, attempts[task])
                    results[task] = RewardResult(0.0, "worker_crash", _box_or_none(item))
            self._replace(worker)

        while pending or any(w.task is not None for w in self._workers):
            now = time.monotonic()
            for worker in list(self._workers):
                if worker.ready and worker.task is None and pending:
                    task = pending.popleft()
                    try:
                        worker.conn.send((task, batch[task]))
                    except (BrokenPipeError, OSError):
                        pending.appendleft(task)
                        crashed(worker)
                        continue
                    worker.task = task
                    worker.deadline = now + cfg.timeout_s + cfg.kill_grace_s

            busy = [w for w in self._workers if w.task is not None]
            waiting = [w for w in self._workers if not w.ready or w.task is not None]
            wait_s = max(0.0, min((w.deadline for w in busy), default=now + 1.0) - time.monotonic())
            wait([w.conn for w in waiting] + [w.process.sentinel for w in waiting], timeout=wait_s)

            for worker in list(self._workers):
                if worker.conn.poll():
                    try:
                        tag, payload = worker.conn.recv()
                    except (EOFError, OSError):
                        crashed(worker)
                        continue
                    if tag == "ready":
                        worker.ready = True
                    else:
                        results[tag] = payload
                        if payload.reason == "timeout":
                            self.stats["timeouts"] += 1
                        worker.task = None
                elif not worker.process.is_alive():
                    crashed(worker)
                elif worker.task is not None and time.monotonic() >= worker.deadline:
                    task = worker.task
                    self.stats["timeouts"] += 1
                    self.stats["killed"] += 1
                    results[task] = RewardResult(0.0, "timeout", _box_or_none(batch[task]))
                    worker.task = None
                    self._replace(worker)
        return results  # type: ignore[return-value]


def _box_or_none(item: RewardItem) -> str | None:
    return last_boxed_content(item.response) if check_style(item.style) == "math" else None
