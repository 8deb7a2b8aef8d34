"""The generation worker: one thread that turns queued sequences into batches
(``generation.BatchGenerator``), and what decides when it may touch the model.

- Every sequence is answered: a failed batch is retried request by request so one bad
  request fails alone (500), and nothing a request carries can stop the worker.
- Sequences end early when aborted (/abort_request, an abort-mode pause) or when their
  request's deadline passes.
- ``Gate`` serializes the worker's batches with exclusive operations (weight swaps,
  memory release): an exclusive operation waits until the running batch finishes or is
  parked by an in-place pause, and no batch starts while one waits. So a sequence never
  mixes weights unless they were swapped during an in-place pause (SGLang's rule: a
  paused engine updates at once, a running one after its requests).
- ``problem()`` is the watchdog: the worker died, or sequences wait and nothing moved
  for longer than the watchdog limit while generation was not paused or released.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Literal

from megatron_hpt.rollout.generation import BatchGenerator, SequenceResult, StepHooks
from megatron_hpt.rollout.server.validation import Row

log = logging.getLogger("megatron_hpt.rollout.server")

PauseMode = Literal["abort", "retract", "in_place"]
"""SGLang's /pause_generation modes: abort running requests, or keep them where they are
(retract is served like in_place: this server has no KV cache to give back)."""


class GenerationFailed(RuntimeError):
    """A batch raised; the requests in it are answered with this (HTTP 500)."""


@dataclass(eq=False)
class PendingSequence:
    """One row on its way through the worker, and how its request gets the result."""

    row: Row
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    abort_epoch: int
    deadline: float
    """time.monotonic() after which the sequence is aborted."""
    request_id: int
    abort_message: str | None = None
    """Set (from the event loop) to stop this sequence at its next step."""
    expired: bool = False
    """The sequence was stopped by its deadline."""
    answered: bool = False
    """The worker has sent this sequence's result (or error); set on the worker thread."""


class Gate:
    """Who may use the model now: the worker's batch, or one exclusive operation."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.pause_mode: PauseMode | None = None
        self.released = False
        self._batch_active = False
        self._parked = False
        self._exclusive = False
        self._waiting = 0
        self.batches_started = 0

    def _may_start(self) -> bool:
        return self.pause_mode is None and not self.released and not self._exclusive and self._waiting == 0

    def _must_park(self) -> bool:
        return self._exclusive or self.pause_mode in ("in_place", "retract")

    def begin_batch(self, timeout_s: float) -> bool:
        """Waits until a batch may start (False after timeout_s: the caller polls again)."""
        with self._cond:
            if not self._cond.wait_for(self._may_start, timeout_s):
                return False
            self._batch_active = True
            self.batches_started += 1
            return True

    def step(self) -> None:
        """Between two forwards: stay parked while paused in place or while an exclusive
        operation runs."""
        with self._cond:
            if not self._must_park():
                return
            self._parked = True
            self._cond.notify_all()
            self._cond.wait_for(lambda: not self._must_park())
            self._parked = False

    def end_batch(self) -> None:
        with self._cond:
            self._batch_active = False
            self._cond.notify_all()

    @contextlib.contextmanager
    def exclusive(self, timeout_s: float) -> Iterator[None]:
        """Holds the model alone: waits (at most timeout_s, then TimeoutError) until no
        batch runs or the running one is parked."""
        with self._cond:
            self._waiting += 1
            try:
                ok = self._cond.wait_for(lambda: not self._exclusive and (not self._batch_active or self._parked), timeout_s)
            finally:
                self._waiting -= 1
                self._cond.notify_all()
            if not ok:
                raise TimeoutError(f"the running batch did not finish within {timeout_s:.0f} s")
            self._exclusive = True
        try:
            yield
        finally:
            with self._cond:
                self._exclusive = False
                self._cond.notify_all()

    def set_pause(self, mode: PauseMode | None) -> None:
        with self._cond:
            self.pause_mode = mode
            self._cond.notify_all()

    def set_released(self, released: bool) -> None:
        with self._cond:
            self.released = released
            self._cond.notify_all()

    @property
    def batch_active(self) -> bool:
        return self._batch_active

    @property
    def parked(self) -> bool:
        """The running batch is parked between two forwards (in-place pause, weight swap)."""
        return self._parked

    def generation_held(self) -> bool:
        """Generation is stopped on purpose (paused, released, weights being swapped)."""
        return self.pause_mode is not None or self.released or self._exclusive or self._waiting > 0


@dataclass(kw_only=True, frozen=True)
class WorkerOptions:
    max_batch_size: int
    """Most sequences decoded together."""
    batch_wait_s: float
    """A batch closes once no request came for this long."""
    watchdog_s: float
    """No progress for this long while sequences wait means the worker is stuck."""
    max_pending: int
    """Most sequences queued or running at once; more are refused (503)."""


@dataclass
class _Progress:
    pending: int = 0
    last: float = field(default_factory=time.monotonic)


class Scheduler:
    """The queue, the worker thread and its watchdog."""

    def __init__(self, generator: BatchGenerator, options: WorkerOptions, weight_version: Callable[[], str], threads: int = 1):
        self.generator = generator
        self.options = options
        self.gate = Gate()
        self.abort_epoch = 0
        self._weight_version = weight_version
        self._threads = threads
        self._queue: queue.Queue[PendingSequence] = queue.Queue()
        self._progress = _Progress()
        self._lock = threading.Lock()
        self._request_ids = itertools.count()
        self._closed = threading.Event()
        self.worker = threading.Thread(target=self._work, name="generation-worker", daemon=True)
        self.worker.start()

    # -- the event loop's side ----------------------------------------------------

    def new_request_id(self) -> int:
        return next(self._request_ids)

    def try_reserve(self, count: int) -> bool:
        """Counts ``count`` new sequences as pending unless that passes max_pending."""
        with self._lock:
            if self._progress.pending + count > self.options.max_pending:
                return False
            if self._progress.pending == 0:
                self._progress.last = time.monotonic()  # the watchdog clock starts with the work
            self._progress.pending += count
            return True

    def submit(self, p: PendingSequence) -> None:
        """Queues a sequence reserved with try_reserve."""
        self._queue.put(p)

    def abort_all(self) -> None:
        self.abort_epoch += 1

    @property
    def pending(self) -> int:
        return self._progress.pending

    def problem(self) -> str | None:
        """Why generation cannot be trusted to make progress, or None."""
        if not self.worker.is_alive():
            return "the generation worker has stopped"
        with self._lock:
            pending, idle_s = self._progress.pending, time.monotonic() - self._progress.last
        if pending and idle_s > self.options.watchdog_s and not self.gate.generation_held():
            return f"the generation worker made no progress for {idle_s:.0f} s with {pending} sequences waiting (limit {self.options.watchdog_s:g} s)"
        return None

    def close(self) -> None:
        self._closed.set()

    # -- the worker thread ----------------------------------------------------------

    def _work(self) -> None:
        import torch

        torch.set_num_threads(self._threads)
        while not self._closed.is_set():
            batch = self._collect()
            if not batch:
                continue
            try:
                self._run(batch)
            except BaseException as e:  # never let the worker die: answer the batch instead
                log.exception("generation worker error")
                self._fail(batch, e)

    def _collect(self) -> list[PendingSequence]:
        try:
            batch = [self._queue.get(timeout=0.5)]
        except queue.Empty:
            return []
        # Requests sent together arrive over a few milliseconds (each is parsed on the
        # HTTP thread): keep collecting until none came for batch_wait_s, so they
        # decode as one batch instead of queueing behind each other.
        quiet_s = self.options.batch_wait_s
        deadline = time.monotonic() + 50 * quiet_s
        while len(batch) < self.options.max_batch_size and time.monotonic() < deadline:
            try:
                batch.append(self._queue.get(timeout=quiet_s))
            except queue.Empty:
                break
        return batch

    def _run(self, batch: list[PendingSequence]) -> None:
        while not self.gate.begin_batch(timeout_s=0.5):
            if self._closed.is_set():
                self._fail(batch, GenerationFailed("the server is shutting down"))
                return
            self._answer_aborted_while_held(batch)
            batch = [p for p in batch if not p.answered]
        try:
            live = [p for p in batch if not self._answer_if_aborted(p)]
            if live:
                self._mark_progress()
                self._generate(live)
        finally:
            self.gate.end_batch()

    def _answer_aborted_while_held(self, batch: list[PendingSequence]) -> None:
        # Held by a pause or a released memory: aborted or expired requests still get
        # their answer now, not when generation resumes.
        for p in batch:
            self._answer_if_aborted(p)

    def _answer_if_aborted(self, p: PendingSequence) -> bool:
        message = self.abort_reason(p)
        if message is None:
            return False
        self._deliver(p, SequenceResult(finish_type="abort", abort_message=message))
        return True

    def abort_reason(self, p: PendingSequence) -> str | None:
        if p.abort_epoch < self.abort_epoch:
            return "Aborted by /abort_request (abort_all) or /pause_generation."
        if p.abort_message is not None:
            return p.abort_message
        if time.monotonic() > p.deadline:
            p.expired = True
            return "The request passed the server's deadline (--request-deadline-s)."
        return None

    def _generate(self, live: list[PendingSequence]) -> None:
        try:
            results = self.generator.generate([p.row.spec for p in live], tags=live, hooks=_Hooks(self))
        except Exception as e:
            requests = {p.request_id for p in live}
            if len(requests) == 1:
                log.exception("generation failed")
                self._fail(live, e)
                return
            # Retry request by request: the one that breaks the batch fails alone.
            for rid in sorted(requests):
                self._generate([p for p in live if p.request_id == rid])
            return
        for p, r in zip(live, results):
            self._deliver(p, r)

    def _mark_progress(self) -> None:
        with self._lock:
            self._progress.last = time.monotonic()

    def _deliver(self, p: PendingSequence, result: SequenceResult | None, error: BaseException | None = None) -> None:
        if p.answered:
            return
        p.answered = True
        with self._lock:
            self._progress.pending -= 1
            self._progress.last = time.monotonic()
        _resolve(p, result, error)

    def _fail(self, batch: list[PendingSequence], error: BaseException) -> None:
        failure = error if isinstance(error, GenerationFailed) else GenerationFailed(f"generation failed: {type(error).__name__}: {error}")
        for p in batch:
            self._deliver(p, None, failure)


def _resolve(p: PendingSequence, result: SequenceResult | None, error: BaseException | None) -> None:
    def settle() -> None:
        if p.future.done():
            return
        if error is not None:
            p.future.set_exception(error)
        else:
            p.future.set_result(result)

    try:
        p.loop.call_soon_threadsafe(settle)
    except RuntimeError:
        pass  # the event loop is closed: the server is shutting down


class _Hooks(StepHooks):
    def __init__(self, scheduler: Scheduler):
        self.scheduler = scheduler

    def before_step(self) -> None:
        self.scheduler._mark_progress()
        self.scheduler.gate.step()

    def aborted(self, tag: PendingSequence) -> str | None:
        return self.scheduler.abort_reason(tag)

    def weight_version(self) -> str:
        return self.scheduler._weight_version()
