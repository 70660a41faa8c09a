"""The peer fetch service over real servers on loopback ports (no Ray): results over grpc.aio,
prefix blocks over the block stream (whose own framing and defences: `test_peer_blocks.py`).

Every failure a peer can cause (down, slow, raising, over a limit, hostile) must reach the caller
as a miss within its deadline, never as an exception.
"""

from __future__ import annotations

import asyncio
import random
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Sequence

import grpc
import grpc.aio
import pytest
import pytest_asyncio

from cluster.sharing.peer import (
    AUTH_METADATA_KEY,
    PeerClient,
    PeerLimits,
    PeerServer,
    method_path,
    peer_credential,
)
from cluster.sharing.proto import peer_pb2, peer_pb2_grpc
from tests.support.prefix_runs import leading_run
from tests.support.processes import free_port

pytestmark = pytest.mark.integration

MiB = 1024 * 1024
SLACK_S = 0.5  # scheduling noise on a loaded 2-core machine; deadlines under test are 0.1-0.2 s


KEY = secrets.token_bytes(32)
"""The peer key that every server and client of these tests share."""


def keep(value: bytes) -> bytes:
    """The decoder that takes every value as it came."""
    return value


def _bytes(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


def _auth(address: str, method: str) -> tuple[tuple[str, str], ...]:
    """Metadata that authenticates one call of `method` on a plain stub."""
    credential = peer_credential(
        KEY, method_path(method), address, time.time(), secrets.token_bytes(16)
    )
    return ((AUTH_METADATA_KEY, credential),)


class MemoryBackend:
    """A PeerBackend over two dicts."""

    def __init__(self) -> None:
        self.results: dict[str, bytes] = {}
        self.blocks: dict[bytes, bytes] = {}

    async def get_results(self, keys: Sequence[str]) -> list[bytes | None]:
        return [self.results.get(key) for key in keys]

    async def get_prefix(self, hashes: Sequence[bytes]) -> list[bytes]:
        """The leading run of `hashes` held, one value per block."""
        return leading_run(self.blocks, hashes)

    async def put_results(self, items: Sequence[tuple[str, bytes]]) -> None:
        self.results.update(items)


class SlowBackend(MemoryBackend):
    def __init__(self, delay_s: float) -> None:
        super().__init__()
        self.delay_s = delay_s

    async def get_results(self, keys: Sequence[str]) -> list[bytes | None]:
        await asyncio.sleep(self.delay_s)
        return await super().get_results(keys)

    async def get_prefix(self, hashes: Sequence[bytes]) -> list[bytes]:
        await asyncio.sleep(self.delay_s)
        return await super().get_prefix(hashes)


class FaultyBackend(MemoryBackend):
    """Fails the next call in the way `fault` says, then behaves."""

    def __init__(self) -> None:
        super().__init__()
        self.fault: str | None = None

    def _take(self) -> str | None:
        fault, self.fault = self.fault, None
        if fault == "raise":
            raise RuntimeError("the cache broke")
        return fault

    async def get_results(self, keys: Sequence[str]) -> list[bytes | None]:
        fault = self._take()
        values = await super().get_results(keys)
        if fault == "short":
            return values[:-1]
        if fault == "not-bytes":
            return ["text", *values[1:]]  # type: ignore[list-item]
        return values

    async def get_prefix(self, hashes: Sequence[bytes]) -> list[bytes]:
        self._take()
        return await super().get_prefix(hashes)

    async def put_results(self, items: Sequence[tuple[str, bytes]]) -> None:
        self._take()
        await super().put_results(items)


@pytest_asyncio.fixture
async def client() -> AsyncIterator[PeerClient]:
    client = PeerClient(KEY)
    yield client
    await client.close()


async def _serve(backend: MemoryBackend, limits: PeerLimits | None = None) -> PeerServer:
    server = PeerServer(backend, KEY, limits or PeerLimits())
    await server.start("127.0.0.1", 0)
    return server


@pytest.fixture
def backend() -> MemoryBackend:
    return MemoryBackend()


@pytest_asyncio.fixture
async def server(backend: MemoryBackend) -> AsyncIterator[PeerServer]:
    server = await _serve(backend)
    yield server
    await server.stop(0)


@pytest.fixture
def address(server: PeerServer) -> str:
    assert server.address is not None
    return server.address


@pytest.fixture
def blocks_address(server: PeerServer) -> str:
    assert server.blocks_address is not None
    return server.blocks_address


# --- Round trips -------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_a_batch_of_64_results_comes_back_in_order_with_its_misses(
    client: PeerClient, backend: MemoryBackend, address: str
) -> None:
    keys = [f"key-{i:02d}" for i in range(64)]
    expected: list[bytes | None] = []
    for i, key in enumerate(keys):
        value = None if i % 3 == 0 else _bytes(i, i * 37)
        if i == 2:
            value = b""  # an empty value is a hit, not a miss
        if value is not None:
            backend.results[key] = value
        expected.append(value)

    assert await client.get_results(address, keys, timeout_s=2.0) == expected
    stats = client.stats()
    assert (stats.requests, stats.hits, stats.misses, stats.errors, stats.timeouts) == (
        1,
        42,
        22,
        0,
        0,
    )
    assert stats.bytes_received == sum(len(v) for v in expected if v is not None)
    assert stats.latency_s > 0
    assert await client.get_results(address, [], timeout_s=2.0) == []


@pytest.mark.asyncio
async def test_a_5_MiB_block_and_small_ones_come_back_bit_exactly_up_to_the_first_miss(
    client: PeerClient, backend: MemoryBackend, blocks_address: str
) -> None:
    big = _bytes(5, 5 * MiB + 3)
    small = [_bytes(100 + i, 64 * 1024) for i in range(6)]
    tiny = [_bytes(200 + i, 10 + i) for i in range(3)]  # written together, not one by one
    backend.blocks[b"big"] = big
    for i, block in enumerate(small):
        backend.blocks[b"small-%d" % i] = block
    for i, block in enumerate(tiny):
        backend.blocks[b"tiny-%d" % i] = block
    backend.blocks[b"empty"] = b""
    hashes = [
        b"small-0",
        b"big",
        b"tiny-0",
        b"small-1",
        b"empty",
        b"tiny-1",
        *(b"small-%d" % i for i in (2, 3, 4, 5)),
        b"tiny-2",
    ]
    expected = [small[0], big, tiny[0], small[1], b"", tiny[1], *small[2:], tiny[2]]

    assert await client.get_prefix(blocks_address, hashes, keep, timeout_s=5.0) == expected
    assert client.stats().bytes_received == sum(len(b) for b in expected)
    # The run ends at the first block the peer does not hold (on the connection kept open).
    with_gap = [*hashes[:2], b"absent", *hashes[2:]]
    assert await client.get_prefix(blocks_address, with_gap, keep, 5.0) == expected[:2]
    assert await client.get_prefix(blocks_address, [b"absent"], keep, 5.0) == []
    assert client.stats().errors == 0


@pytest.mark.asyncio
async def test_put_then_get(
    client: PeerClient, backend: MemoryBackend, address: str, blocks_address: str
) -> None:
    results = [(f"r{i}", _bytes(i, 200 + i)) for i in range(10)]
    blocks = [(b"b%d" % i, _bytes(50 + i, 64 * 1024)) for i in range(8)]
    blocks.append((b"large", _bytes(7, 3 * MiB + 1)))
    backend.blocks.update(blocks)

    assert await client.put_results(address, results, timeout_s=2.0)
    assert backend.results == dict(results)
    assert await client.get_results(address, [k for k, _ in results], 2.0) == [
        v for _, v in results
    ]
    assert await client.get_prefix(blocks_address, [h for h, _ in blocks], keep, 5.0) == [
        v for _, v in blocks
    ]
    assert await client.put_results(address, [])
    assert await client.ping(address)


@pytest.mark.asyncio
async def test_a_key_asked_twice_is_asked_once_and_answered_twice(
    client: PeerClient, backend: MemoryBackend, address: str
) -> None:
    backend.results.update({"a": b"1", "b": b"2"})
    assert await client.get_results(address, ["a", "b", "a", "x"], 2.0) == [b"1", b"2", b"1", None]
    assert await client.put_results(address, [("c", b"old"), ("c", b"new")], 2.0)
    assert backend.results["c"] == b"new"
    assert client.stats().errors == 0


@pytest.mark.asyncio
async def test_concurrent_clients_each_get_their_own_answers(
    backend: MemoryBackend, address: str, blocks_address: str
) -> None:
    for i in range(200):
        backend.results[f"k{i}"] = _bytes(i, 100 + i)
        backend.blocks[b"h%d" % i] = _bytes(1000 + i, 16 * 1024)
    clients = [PeerClient(KEY) for _ in range(6)]

    async def work(client: PeerClient, seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(10):
            picked = rng.sample(range(200), 16)
            results, blocks = await asyncio.gather(
                client.get_results(address, [f"k{i}" for i in picked], 5.0),
                client.get_prefix(blocks_address, [b"h%d" % i for i in picked], keep, 5.0),
            )
            assert results == [backend.results[f"k{i}"] for i in picked]
            assert blocks == [backend.blocks[b"h%d" % i] for i in picked]

    try:
        await asyncio.gather(*(work(c, n) for n, c in enumerate(clients)))
    finally:
        await asyncio.gather(*(c.close() for c in clients))
    assert all(c.stats().misses == 0 and c.stats().hits == 320 for c in clients)  # 160 + 160


# --- A dead, slow or failing peer is a miss -----------------------------------------------------


async def _timed(call: Awaitable[object]) -> tuple[object, float]:
    started = time.monotonic()
    result = await call
    return result, time.monotonic() - started


@pytest.mark.asyncio
async def test_a_stopped_or_absent_server_is_a_miss_within_the_deadline(
    client: PeerClient, backend: MemoryBackend
) -> None:
    backend.results["k"] = b"v"
    backend.blocks[b"h"] = b"block"
    server = await _serve(backend)
    address, blocks_address = server.address, server.blocks_address
    assert address is not None and blocks_address is not None
    assert await client.get_results(address, ["k"], 2.0) == [b"v"]  # the channel is up
    assert await client.get_prefix(blocks_address, [b"h"], keep, 2.0) == [b"block"]  # and one
    await server.stop(0)

    absent = f"127.0.0.1:{free_port()}"
    for address_now, blocks_now in ((address, blocks_address), (absent, absent)):
        result, took = await _timed(client.get_results(address_now, ["k", "x"], 0.2))
        assert result == [None, None] and took < 0.2 + SLACK_S
        result, took = await _timed(client.get_prefix(blocks_now, [b"h"], keep, 0.2))
        assert result == [] and took < 0.2 + SLACK_S
        assert not await client.put_results(address_now, [("k", b"v")], 0.2)
        assert not await client.ping(address_now, 0.2)
    stats = client.stats()
    assert stats.requests == 2 + 2 * 4
    assert stats.errors + stats.timeouts == 2 * 4
    assert stats.hits == 2


@pytest.mark.asyncio
async def test_a_restarted_peer_is_served_again_on_the_cached_channel(
    client: PeerClient, backend: MemoryBackend
) -> None:
    backend.results["k"] = b"v"
    first = await _serve(backend)
    address = first.address
    assert address is not None
    assert await client.get_results(address, ["k"], 2.0) == [b"v"]
    await first.stop(0)
    assert await client.get_results(address, ["k"], 0.2) == [None]

    second = PeerServer(backend, KEY)
    await second.start("127.0.0.1", int(address.rsplit(":", 1)[1]))
    try:
        deadline = time.monotonic() + 3.0  # reconnect backoff is capped at 2 s
        while await client.get_results(address, ["k"], 0.2) != [b"v"]:
            assert time.monotonic() < deadline, "the client never dialled the peer again"
            await asyncio.sleep(0.05)
    finally:
        await second.stop(0)


@pytest.mark.asyncio
async def test_a_slow_backend_is_a_miss_within_the_deadline(client: PeerClient) -> None:
    backend = SlowBackend(delay_s=2.0)
    backend.results["k"] = b"v"
    backend.blocks[b"h"] = b"block"
    server = await _serve(backend)
    assert server.address is not None
    try:
        result, took = await _timed(client.get_results(server.address, ["k"], 0.1))
        assert result == [None] and took < 0.1 + SLACK_S
        assert server.blocks_address is not None
        result, took = await _timed(client.get_prefix(server.blocks_address, [b"h"], keep, 0.1))
        assert result == [] and took < 0.1 + SLACK_S
        assert client.stats().timeouts == 2
        backend.delay_s = 0
        assert await client.get_results(server.address, ["k"], 2.0) == [b"v"]
    finally:
        await server.stop(0)


@pytest.mark.parametrize("fault", ["raise", "short", "not-bytes"])
@pytest.mark.asyncio
async def test_a_failing_backend_is_a_miss_and_the_server_serves_on(
    client: PeerClient, fault: str
) -> None:
    backend = FaultyBackend()
    backend.results.update({"a": b"1", "b": b"2"})
    server = await _serve(backend)
    assert server.address is not None
    stub_channel = grpc.aio.insecure_channel(server.address)
    try:
        backend.fault = fault
        assert await client.get_results(server.address, ["a", "b"], 2.0) == [None, None]
        assert client.stats().errors == 1
        assert await client.get_results(server.address, ["a", "b"], 2.0) == [b"1", b"2"]

        backend.fault = fault
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await peer_pb2_grpc.PeerStub(stub_channel).GetResults(
                peer_pb2.GetResultsRequest(keys=["a", "b"]),
                timeout=2.0,
                metadata=_auth(server.address, "GetResults"),
            )
        assert raised.value.code() == grpc.StatusCode.INTERNAL
    finally:
        await stub_channel.close()
        await server.stop(0)


@pytest.mark.asyncio
async def test_a_raising_backend_fails_block_and_put_calls_alike(client: PeerClient) -> None:
    backend = FaultyBackend()
    backend.blocks[b"h"] = b"block"
    server = await _serve(backend)
    assert server.address is not None and server.blocks_address is not None
    try:
        backend.fault = "raise"
        assert await client.get_prefix(server.blocks_address, [b"h"], keep, 2.0) == []
        backend.fault = "raise"
        assert not await client.put_results(server.address, [("k", b"v")], 2.0)
        assert await client.get_prefix(server.blocks_address, [b"h"], keep, 2.0) == [b"block"]
        assert await client.put_results(server.address, [("k", b"v")], 2.0)
        assert client.stats().errors == 2
    finally:
        await server.stop(0)


@pytest.mark.asyncio
async def test_requests_over_the_servers_limits_are_rejected_cleanly(
    client: PeerClient, backend: MemoryBackend
) -> None:
    backend.results.update({f"k{i}": b"v" for i in range(9)})
    server = await _serve(backend, PeerLimits(max_keys=8, max_key_bytes=32))
    assert server.address is not None
    channel = grpc.aio.insecure_channel(server.address)
    try:
        nine = [f"k{i}" for i in range(9)]
        assert await client.get_results(server.address, nine, 2.0) == [None] * 9
        nine_hashes = [b"h%d" % i for i in range(9)]
        assert server.blocks_address is not None
        assert await client.get_prefix(server.blocks_address, nine_hashes, keep, 2.0) == []
        assert await client.get_results(server.address, ["x" * 33], 2.0) == [None]
        assert not await client.put_results(server.address, [(k, b"v") for k in nine], 2.0)
        assert client.stats().errors == 4
        assert await client.get_results(server.address, nine[:8], 2.0) == [b"v"] * 8

        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await peer_pb2_grpc.PeerStub(channel).GetResults(
                peer_pb2.GetResultsRequest(keys=nine),
                timeout=2.0,
                metadata=_auth(server.address, "GetResults"),
            )
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "at most 8" in (raised.value.details() or "")
    finally:
        await channel.close()
        await server.stop(0)


@pytest.mark.asyncio
async def test_values_over_the_clients_limits_are_misses_or_not_sent(
    backend: MemoryBackend,
) -> None:
    backend.results["big"] = _bytes(1, 2048)
    backend.blocks[b"big"] = _bytes(2, 4096)
    backend.blocks[b"ok"] = b"ok"
    server = await _serve(backend)
    client = PeerClient(KEY, PeerLimits(max_value_bytes=1024, max_batch_bytes=1024))
    assert server.address is not None and server.blocks_address is not None
    try:
        assert await client.get_results(server.address, ["big"], 2.0) == [None]
        # A value announced over the reader's limits ends the exchange before it is read.
        assert await client.get_prefix(server.blocks_address, [b"big", b"ok"], keep, 2.0) == []
        assert await client.get_prefix(server.blocks_address, [b"ok"], keep, 2.0) == [b"ok"]
    finally:
        await client.close()
        await server.stop(0)


@pytest.mark.asyncio
async def test_results_that_would_overflow_the_response_are_misses(backend: MemoryBackend) -> None:
    limits = PeerLimits(max_message_bytes=2 * MiB)
    values = [_bytes(i, 900 * 1024) for i in range(3)]
    backend.results.update({f"k{i}": value for i, value in enumerate(values)})
    server = await _serve(backend, limits)
    client = PeerClient(KEY, limits)
    assert server.address is not None
    try:
        keys = ["k0", "absent", "k1", "k2"]
        assert await client.get_results(server.address, keys, 2.0) == [
            values[0],
            None,
            values[1],
            None,
        ]
        assert await client.get_results(server.address, ["k2"], 2.0) == [values[2]]
        assert client.stats().errors == 0
    finally:
        await client.close()
        await server.stop(0)


# --- A hostile peer ------------------------------------------------------------------------------


class HostileServicer(peer_pb2_grpc.PeerServicer):
    """Answers with whatever the test put here."""

    def __init__(self) -> None:
        self.entries: list[peer_pb2.Entry] = []
        self.stored = 0

    async def GetResults(self, request, context):  # type: ignore[no-untyped-def]
        return peer_pb2.GetResultsResponse(entries=self.entries)

    async def PutResults(self, request, context):  # type: ignore[no-untyped-def]
        return peer_pb2.PutAck(stored=self.stored)

    async def Ping(self, request, context):  # type: ignore[no-untyped-def]
        return peer_pb2.PingResponse()


@pytest_asyncio.fixture
async def hostile() -> AsyncIterator[tuple[HostileServicer, str]]:
    servicer = HostileServicer()
    server = grpc.aio.server()
    peer_pb2_grpc.add_PeerServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield servicer, f"127.0.0.1:{port}"
    await server.stop(0)


@pytest.mark.asyncio
async def test_a_wrong_number_of_entries_or_a_false_ack_is_a_miss(
    client: PeerClient, hostile: tuple[HostileServicer, str]
) -> None:
    servicer, address = hostile
    servicer.entries = [peer_pb2.Entry(found=True, value=b"x")] * 3
    assert await client.get_results(address, ["a", "b"], 2.0) == [None, None]
    servicer.entries = [peer_pb2.Entry(found=True, value=b"x")]
    assert await client.get_results(address, ["a", "b"], 2.0) == [None, None]
    servicer.entries = [peer_pb2.Entry(found=False, value=b"x"), peer_pb2.Entry(found=True)]
    assert await client.get_results(address, ["a", "b"], 2.0) == [None, b""]
    servicer.stored = 1
    assert not await client.put_results(address, [("a", b"1"), ("b", b"2")], 2.0)
    stats = client.stats()
    assert (stats.errors, stats.hits, stats.misses) == (2, 1, 5)


@pytest.mark.asyncio
async def test_bytes_that_are_no_message_are_a_miss(client: PeerClient) -> None:
    garbage = b"\xff\xff\xff\xff not a protobuf message"

    async def results(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return garbage

    server = grpc.aio.server()
    # No serializers: the handlers answer raw bytes under the service's method names.
    handlers = {
        "GetResults": grpc.unary_unary_rpc_method_handler(results),
        "Ping": grpc.unary_unary_rpc_method_handler(results),
    }
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler("raycache.peer.v1.Peer", handlers)]
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    address = f"127.0.0.1:{port}"
    try:
        assert await client.get_results(address, ["a"], 2.0) == [None]
        assert not await client.ping(address, 2.0)
        assert client.stats().errors == 2
    finally:
        await server.stop(0)


# --- Server start-up ------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_the_server_advertises_the_callers_host_and_refuses_a_taken_port(
    backend: MemoryBackend, client: PeerClient
) -> None:
    with pytest.raises(ValueError, match="advertise_host"):
        await PeerServer(backend, KEY).start("0.0.0.0", 0)
    server = PeerServer(backend, KEY)
    address = await server.start("0.0.0.0", 0, advertise_host="127.0.0.1")
    try:
        host, port = address.rsplit(":", 1)
        assert host == "127.0.0.1" and int(port) > 0 and server.address == address
        assert server.blocks_address is not None
        blocks_host, blocks_port = server.blocks_address.rsplit(":", 1)
        assert blocks_host == "127.0.0.1" and blocks_port != port
        assert await client.ping(address)
        with pytest.raises(OSError):
            await PeerServer(backend, KEY).start("127.0.0.1", int(port))
        with pytest.raises(RuntimeError):
            await server.start("127.0.0.1", 0)
    finally:
        await server.stop(0)
    assert server.address is None and server.blocks_address is None
