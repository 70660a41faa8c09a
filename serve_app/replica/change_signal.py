"""A change signal from any thread to coroutines waiting on their event loops.

    seen = signal.seq            # read before checking the condition
    while not condition():
        if not await signal.wait_past(seen, remaining):
            break                # timed out
        seen = signal.seq

A waiter reads `seq` before it checks its condition, so a `notify` between the check and the
wait is not lost: `wait_past` returns at once when anything was notified since `seen`. Waiting
holds no thread: a version switch or a model load finishing in a worker thread wakes the
requests that wait for it on the replica's loop.
"""

from __future__ import annotations

import asyncio
import threading


class ChangeSignal:
    """Counts `notify` calls and wakes the coroutines waiting for the next one."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seq = 0
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []

    @property
    def seq(self) -> int:
        """How many times `notify` was called."""
        return self._seq

    def notify(self) -> None:
        """Wake every waiter (callable from any thread)."""
        with self._lock:
            self._seq += 1
            waiters, self._waiters = self._waiters, []
        for loop, future in waiters:
            if not loop.is_closed():
                loop.call_soon_threadsafe(_settle, future)

    async def wait_past(self, seen: int, timeout_s: float) -> bool:
        """Wait until `notify` was called after `seq` read `seen` (True), or `timeout_s`
        passed (False)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        with self._lock:
            if self._seq != seen:
                return True
            self._waiters.append((loop, future))
        try:
            await asyncio.wait_for(future, timeout=max(timeout_s, 0.0))
            return True
        except TimeoutError:
            return False
        finally:
            with self._lock:
                if (loop, future) in self._waiters:
                    self._waiters.remove((loop, future))


def _settle(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
