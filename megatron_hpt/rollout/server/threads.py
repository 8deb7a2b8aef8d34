"""Blocking work off the event loop, in daemon threads.

``asyncio.to_thread`` runs on the loop's default executor, whose threads are joined when
the loop closes and again when the interpreter exits: one call that hangs (a rendezvous
with a dead address, a collective whose peer died) then holds SIGTERM up for as long as
it hangs. A daemon thread per call is abandoned at exit instead, and every caller here
bounds its own wait.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any, Callable


def _settle(future: asyncio.Future, value: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(value)


async def run_blocking(fn: Callable[..., Any], *args: Any, name: str = "blocking-call") -> Any:
    """``fn(*args)`` in a fresh daemon thread; its result (or exception) when it returns."""
    loop = asyncio.get_running_loop()
    future = loop.create_future()

    def target() -> None:
        value, error = None, None
        try:
            value = fn(*args)
        except BaseException as e:  # handed to the awaiting coroutine
            error = e
        try:
            loop.call_soon_threadsafe(_settle, future, value, error)
        except RuntimeError:
            pass  # the loop closed while this call ran (shutdown): nobody waits for it

    threading.Thread(target=target, name=name, daemon=True).start()
    return await future
