"""The circuit breaker on a fake clock: closed -> open -> half_open -> closed or open again."""

import asyncio
import time

import pytest

from cluster.sharing.breaker import BreakerStats, CircuitBreaker


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def tripped(clock: FakeClock, threshold: int = 3, reset_timeout_s: float = 2.0) -> CircuitBreaker:
    breaker = CircuitBreaker(threshold, reset_timeout_s, timer=clock)
    for _ in range(threshold):
        assert breaker.allow()
        breaker.record_failure()
    assert breaker.state == "open"
    return breaker


def test_opens_after_threshold_consecutive_failures(clock):
    breaker = CircuitBreaker(failure_threshold=3, reset_timeout_s=2.0, timer=clock)
    for _ in range(2):
        breaker.record_failure()
        assert breaker.state == "closed" and breaker.allow()
    breaker.record_failure()
    assert breaker.state == "open"
    assert not breaker.allow()
    assert breaker.stats() == BreakerStats("open", opened=1, rejected=1, consecutive_failures=3)


def test_a_success_resets_the_count_of_consecutive_failures(clock):
    breaker = CircuitBreaker(failure_threshold=3, timer=clock)
    for _ in range(10):
        breaker.record_failure()
        breaker.record_failure()
        breaker.record_success()
    assert breaker.state == "closed"
    assert breaker.opened == 0


def test_open_refuses_until_the_reset_timeout_then_lets_one_probe_through(clock):
    breaker = tripped(clock, reset_timeout_s=2.0)
    clock.advance(1.999)
    assert not any(breaker.allow() for _ in range(100))
    clock.advance(0.001)
    assert breaker.state == "half_open"
    assert breaker.allow()  # the probe
    assert not breaker.allow()  # everyone else waits for its outcome
    assert breaker.stats().rejected == 101


def test_successful_probe_closes(clock):
    breaker = tripped(clock)
    clock.advance(2.0)
    assert breaker.allow()
    breaker.record_success()
    assert breaker.state == "closed"
    assert all(breaker.allow() for _ in range(10))
    assert breaker.stats().consecutive_failures == 0


def test_failed_probe_reopens_and_restarts_the_timeout(clock):
    breaker = tripped(clock, reset_timeout_s=2.0)
    clock.advance(5.0)
    assert breaker.allow()
    breaker.record_failure()
    assert breaker.state == "open"
    assert breaker.opened == 2
    clock.advance(1.5)
    assert not breaker.allow()  # the timeout counts from the failed probe, not the first opening
    clock.advance(0.5)
    assert breaker.allow()


def test_failures_while_open_extend_it_without_counting_an_opening(clock):
    breaker = tripped(clock, reset_timeout_s=2.0)
    clock.advance(1.5)
    breaker.record_failure()  # a call that started before the breaker opened
    clock.advance(1.0)
    assert breaker.state == "open"
    assert breaker.opened == 1


def test_concurrent_callers_in_half_open_get_exactly_one_probe(clock):
    breaker = tripped(clock)
    clock.advance(2.0)
    probes = []

    async def call(index: int) -> None:
        if not breaker.allow():
            return
        probes.append(index)
        await asyncio.sleep(0)  # the probe is in flight while the others ask
        await asyncio.sleep(0)
        breaker.record_success()

    async def scenario() -> None:
        await asyncio.gather(*(call(index) for index in range(50)))

    asyncio.run(scenario())
    assert probes == [0]
    assert breaker.state == "closed"


def test_a_probe_that_never_reports_is_replaced_after_another_timeout(clock):
    breaker = tripped(clock, reset_timeout_s=2.0)
    clock.advance(2.0)
    assert breaker.allow()  # this probe's task is cancelled: it never records an outcome
    clock.advance(1.9)
    assert not breaker.allow()
    clock.advance(0.1)
    assert breaker.allow()
    assert not breaker.allow()


def test_an_open_breaker_costs_microseconds(clock):
    breaker = tripped(clock)
    started = time.perf_counter()
    for _ in range(100_000):
        breaker.allow()
    assert time.perf_counter() - started < 1.0


@pytest.mark.parametrize(
    ("threshold", "timeout"), [(0, 1.0), (-1, 1.0), (1, 0.0), (1, -2.0), (1, float("nan"))]
)
def test_rejects_nonsense_settings(threshold, timeout):
    with pytest.raises(ValueError):
        CircuitBreaker(threshold, timeout)


def test_defaults_and_real_clock():
    breaker = CircuitBreaker()
    assert (breaker.failure_threshold, breaker.reset_timeout_s) == (5, 2.0)
    assert breaker.state == "closed" and breaker.allow()
