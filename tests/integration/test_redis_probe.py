"""The health probe against a real redis-server that the test stops and restarts."""

import asyncio
import time

import pytest

from cluster.sharing.redis_probe import RedisProbe
from tests.support.processes import RedisServer, free_port

pytestmark = pytest.mark.integration


def test_probe_follows_the_server_up_and_down(tmp_path):
    server = RedisServer(tmp_path)
    server.start()
    clock = [0.0]
    probe = RedisProbe(server.url, timeout_s=0.25, ttl_s=1.0, timer=lambda: clock[0])

    async def scenario() -> list[str]:
        seen = [await probe.status()]
        server.stop()
        seen.append(await probe.status())  # remembered for ttl_s: still "up"
        clock[0] += 1.0
        started = time.monotonic()
        seen.append(await probe.status())
        seen.append(f"{time.monotonic() - started:.3f}")
        server.start()
        clock[0] += 1.0
        seen.append(await probe.status())
        await probe.close()
        return seen

    try:
        up, cached, down, took, back = asyncio.run(scenario())
    finally:
        server.stop()
    assert (up, cached, down, back) == ("up", "up", "down", "up")
    assert float(took) < 1.0  # one short attempt, not redis-py's retries


def test_probe_of_a_closed_port_is_down_and_of_no_url_disabled():
    async def scenario() -> tuple[str, str]:
        closed = RedisProbe(f"redis://127.0.0.1:{free_port()}/0", timeout_s=0.2)
        return await closed.status(), await RedisProbe(None).status()

    assert asyncio.run(scenario()) == ("down", "disabled")
