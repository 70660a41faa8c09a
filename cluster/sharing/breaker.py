"""A circuit breaker: stop calling a dependency that keeps failing, and probe it now and then.

States::

    closed ──(failure_threshold consecutive failures)──> open
    open ──(reset_timeout_s passed)──> half_open: the next `allow()` lets ONE probe through
    half_open ──(probe succeeds)──> closed
    half_open ──(probe fails)──> open, and reset_timeout_s starts again

While open, `allow()` is False and costs a clock read: a dead or hung dependency costs callers
nothing. Pure: no I/O, no asyncio; the clock is injected. Not thread-safe: use it from one
thread (an asyncio event loop), where every method runs without interruption.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

__all__ = ["BreakerState", "BreakerStats", "CircuitBreaker"]

BreakerState = Literal["closed", "open", "half_open"]


@dataclass(frozen=True)
class BreakerStats:
    """A snapshot of a breaker's state and counters."""

    state: BreakerState
    opened: int
    """Transitions into `open` (from closed, or from half_open when a probe failed)."""
    rejected: int
    """Calls `allow()` turned away."""
    consecutive_failures: int


class CircuitBreaker:
    """Closed -> open after `failure_threshold` consecutive failures; see the module docstring.

    A probe that never reports back (its task was cancelled) does not wedge the breaker: after
    another `reset_timeout_s` in half_open, the next `allow()` lets a new probe through.
    """

    def __init__(
        self,
        failure_threshold: int = 5,
        reset_timeout_s: float = 2.0,
        timer: Callable[[], float] = time.monotonic,
    ) -> None:
        if failure_threshold < 1:
            raise ValueError(f"failure_threshold must be >= 1, got {failure_threshold}")
        if not reset_timeout_s > 0:
            raise ValueError(f"reset_timeout_s must be > 0, got {reset_timeout_s}")
        self.failure_threshold = failure_threshold
        self.reset_timeout_s = reset_timeout_s
        self._timer = timer
        self._failures = 0
        self._opened_at: float | None = None  # None: closed
        self._probe_at: float | None = None  # when the half-open probe was let through
        self._opened = 0
        self._rejected = 0

    @property
    def state(self) -> BreakerState:
        """`closed`, `open` (calls refused), or `half_open` (a probe may go or has gone)."""
        if self._opened_at is None:
            return "closed"
        if self._timer() - self._opened_at < self.reset_timeout_s:
            return "open"
        return "half_open"

    @property
    def opened(self) -> int:
        """How many times the breaker opened."""
        return self._opened

    def allow(self) -> bool:
        """Whether a call may go now; in half_open, True for the one probe only."""
        if self._opened_at is None:
            return True
        now = self._timer()
        if now - self._opened_at >= self.reset_timeout_s and (
            self._probe_at is None or now - self._probe_at >= self.reset_timeout_s
        ):
            self._probe_at = now
            return True
        self._rejected += 1
        return False

    def record_success(self) -> None:
        """A call succeeded: the dependency answers, so the breaker closes."""
        self._failures = 0
        self._opened_at = None
        self._probe_at = None

    def record_failure(self) -> None:
        """A call failed: count it while closed; (re)open once the threshold is reached.

        A failure while open or half_open (the probe's, or a call that started before the
        breaker opened) restarts the reset timeout.
        """
        self._failures += 1
        if self._opened_at is None and self._failures < self.failure_threshold:
            return
        if self.state != "open":
            self._opened += 1
        self._opened_at = self._timer()
        self._probe_at = None

    def stats(self) -> BreakerStats:
        """A snapshot of the state and counters."""
        return BreakerStats(
            state=self.state,
            opened=self._opened,
            rejected=self._rejected,
            consecutive_failures=self._failures,
        )
