"""The block stream (`cluster.sharing.peer_blocks`) on loopback, against hostile callers and
servers.

An attacker who can reach the block port but lacks the peer key gets a refusal and a closed
connection, no block, and the backend is never asked; requests over the limits are refused
before their body is read; the server's deadline holds whatever the backend or the reader does.
A server that answers anything but a well-formed answer costs the client what came after the
fault, within its deadline, never an exception.
"""

from __future__ import annotations

import asyncio
import secrets
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass

import pytest
import pytest_asyncio

from cluster.secret import ClusterSecret
from cluster.sharing.peer import AUTH_WINDOW_S, PeerClient, PeerLimits, PeerServer
from cluster.sharing.peer_blocks import Status, encode_request
from tests.support.prefix_runs import leading_run

pytestmark = pytest.mark.integration

KEY = ClusterSecret.generate().peer
SLACK_S = 0.5  # scheduling noise on a loaded 2-core machine
HEADER = struct.Struct(
    ">4sBHIB"
)  # the request header, as cluster/sharing/peer_blocks.py documents it


class CountingBackend:
    """A PeerBackend whose blocks count the calls that reach them."""

    def __init__(self) -> None:
        self.blocks: dict[bytes, bytes] = {b"secret-hash": b"secret block"}
        self.calls = 0
        self.delay_s = 0.0

    async def get_results(self, keys: Sequence[str]) -> list[bytes | None]:
        return [None] * len(keys)

    async def get_prefix(self, hashes: Sequence[bytes]) -> list[bytes]:
        self.calls += 1
        await asyncio.sleep(self.delay_s)
        return leading_run(self.blocks, hashes)

    async def put_results(self, items: Sequence[tuple[str, bytes]]) -> None:
        return None


@dataclass
class Served:
    server: PeerServer
    backend: CountingBackend
    address: str
    """The block stream's advertised address."""


@pytest_asyncio.fixture
async def served() -> AsyncIterator[Served]:
    backend = CountingBackend()
    server = PeerServer(backend, KEY, PeerLimits(server_deadline_s=0.3, max_keys=8))
    await server.start("127.0.0.1", 0)
    assert server.blocks_address is not None
    yield Served(server, backend, server.blocks_address)
    await server.stop(0)


def _request(address: str, hashes: Sequence[bytes], key: bytes = KEY, skew_s: float = 0.0) -> bytes:
    return encode_request(key, address, hashes, time.time() + skew_s, secrets.token_bytes(16))


async def _exchange(address: str, request: bytes, timeout_s: float = 2.0) -> bytes:
    """Everything the server sends back for `request` until it closes the connection."""
    host, port = address.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(request)
        async with asyncio.timeout(timeout_s):
            return await reader.read(-1)
    finally:
        writer.close()


def _with_credential(request: bytes, credential: bytes) -> bytes:
    """`request` with its credential replaced."""
    magic, version, count, body, length = HEADER.unpack_from(request)
    rest = request[HEADER.size + length :]
    return HEADER.pack(magic, version, count, body, len(credential)) + credential + rest


def _attacks(address: str) -> dict[str, Callable[[], bytes]]:
    host, port = address.rsplit(":", 1)
    hashes = [b"secret-hash"]
    return {
        "no credential": lambda: _with_credential(_request(address, hashes), b""),
        "a credential made with another key": lambda: _request(
            address, hashes, key=ClusterSecret.generate().peer
        ),
        "a stale credential": lambda: _request(address, hashes, skew_s=-(AUTH_WINDOW_S + 5)),
        "a credential from the future": lambda: _request(address, hashes, skew_s=AUTH_WINDOW_S + 5),
        "a credential for a smaller request": lambda: _with_credential(
            _request(address, [b"secret-hash", b"other-hash"]),
            _credential_of(_request(address, hashes)),
        ),
        "a credential for another server": lambda: _request(f"{host}:{int(port) + 1}", hashes),
        "a malformed credential": lambda: _with_credential(_request(address, hashes), b"1.2.3"),
        "a credential that is not text": lambda: _with_credential(
            _request(address, hashes), bytes(range(128, 255))
        ),
    }


def _credential_of(request: bytes) -> bytes:
    length = HEADER.unpack_from(request)[4]
    return request[HEADER.size : HEADER.size + length]


@pytest.mark.parametrize("attack", sorted(_attacks("127.0.0.1:1")))
@pytest.mark.asyncio
async def test_a_caller_without_a_valid_credential_gets_no_block(
    served: Served, attack: str
) -> None:
    answer = await _exchange(served.address, _attacks(served.address)[attack]())
    assert answer[0] == Status.UNAUTHENTICATED
    assert b"secret block" not in answer
    assert served.server.rejected_calls == 1
    assert served.backend.calls == 0


@pytest.mark.asyncio
async def test_a_replayed_request_is_refused(served: Served) -> None:
    request = _request(served.address, [b"secret-hash"])
    host, port = served.address.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(request)
        assert await reader.readexactly(1) == bytes([Status.OK])
        (length,) = struct.unpack(">I", await reader.readexactly(4))
        assert await reader.readexactly(length) == b"secret block"
    finally:
        writer.close()
    # What an observer saw go by is no good a second time.
    replayed = await _exchange(served.address, request)
    assert replayed[0] == Status.UNAUTHENTICATED
    assert served.backend.calls == 1 and served.server.rejected_calls == 1


@pytest.mark.asyncio
async def test_a_refused_request_is_answered_before_its_body_is_read(served: Served) -> None:
    # A header announcing a body that never comes: a server reading it first would wait.
    header = HEADER.pack(b"RCPB", 1, 1, 1000, 5) + b"1.2.3"
    started = time.monotonic()
    answer = await _exchange(served.address, header)
    assert answer[0] == Status.UNAUTHENTICATED
    assert time.monotonic() - started < SLACK_S


@pytest.mark.asyncio
async def test_requests_over_the_limits_are_refused_before_the_backend_is_asked(
    served: Served,
) -> None:
    too_many = _request(served.address, [b"h%d" % i for i in range(9)])  # max_keys is 8
    repeated = _request(served.address, [b"h", b"h"])
    # A credential for the size announced, with a body over what 2 hashes may take.
    body = 2 * (2 + PeerLimits().max_key_bytes) + 1
    credential = _credential_of(
        encode_request(KEY, served.address, [bytes(body - 2)], time.time(), secrets.token_bytes(16))
    )
    oversized = HEADER.pack(b"RCPB", 1, 2, body, len(credential)) + credential
    for request in (too_many, repeated):
        answer = await _exchange(served.address, request)
        assert answer[0] == Status.INVALID_ARGUMENT, answer
    # Refused on its header alone (its credential names another size, so it is refused first).
    assert (await _exchange(served.address, oversized))[0] in (
        Status.UNAUTHENTICATED,
        Status.INVALID_ARGUMENT,
    )
    assert (await _exchange(served.address, b"GET / HTTP/1.1\r\n\r\n" + bytes(64)))[0] == (
        Status.INVALID_ARGUMENT
    )
    assert served.backend.calls == 0


@pytest.mark.asyncio
async def test_a_slow_backend_is_cut_off_by_the_servers_deadline(served: Served) -> None:
    served.backend.delay_s = 30.0
    started = time.monotonic()
    answer = await _exchange(served.address, _request(served.address, [b"secret-hash"]), 10.0)
    assert answer == b""  # the connection closed, nothing sent
    assert time.monotonic() - started < 0.3 + SLACK_S


@pytest.mark.asyncio
async def test_a_reader_that_stops_reading_is_cut_off_by_the_servers_deadline(
    served: Served,
) -> None:
    hashes = [b"h%d" % i for i in range(8)]
    served.backend.blocks.update({h: bytes(8 * 1024 * 1024) for h in hashes})
    host, port = served.address.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port), limit=64 * 1024)
    try:
        writer.write(_request(served.address, hashes))
        await asyncio.sleep(1.0)  # 64 MiB waiting to be read: the socket buffers fill
        received = len(await reader.read(-1))
    finally:
        writer.close()
    assert received < 64 * 1024 * 1024


@pytest.mark.asyncio
async def test_a_client_with_the_key_reuses_its_connection(served: Served) -> None:
    client = PeerClient(KEY)
    try:
        for _ in range(3):
            assert await client.get_prefix(served.address, [b"secret-hash"], bytes, 2.0) == [
                b"secret block"
            ]
        assert (served.backend.calls, served.server.rejected_calls) == (3, 0)
        # Over the server's own limit of keys: refused there, a miss here.
        nine = [b"h%d" % i for i in range(9)]
        assert await client.get_prefix(served.address, nine, bytes, 2.0) == []
        assert client.stats().errors == 1
        assert await client.get_prefix(served.address, [b"secret-hash"], bytes, 2.0) == [
            b"secret block"
        ]
    finally:
        await client.close()


@pytest.mark.asyncio
async def test_silent_connections_cannot_lock_a_peer_out() -> None:
    backend = CountingBackend()
    server = PeerServer(backend, KEY, PeerLimits(max_concurrent_rpcs=2))
    await server.start("127.0.0.1", 0)
    assert server.blocks_address is not None
    host, port = server.blocks_address.rsplit(":", 1)
    silent = [await asyncio.open_connection(host, int(port)) for _ in range(4)]
    for _, writer in silent[2:]:  # these announce a credential that never comes
        writer.write(HEADER.pack(b"RCPB", 1, 1, 34, 120))
    await asyncio.sleep(0.1)
    client = PeerClient(KEY)
    try:
        # The server is full of connections that never said who they are: it drops the oldest.
        assert await client.get_prefix(server.blocks_address, [b"secret-hash"], bytes, 2.0) == [
            b"secret block"
        ]
        closed = [await asyncio.wait_for(reader.read(), 2.0) for reader, _ in silent[:2]]
        assert closed == [b"", b""]
    finally:
        for _, writer in silent:
            writer.close()
        await client.close()
        await server.stop(0)


@pytest.mark.asyncio
async def test_a_connection_the_server_dropped_is_replaced_without_a_miss() -> None:
    backend = CountingBackend()
    server = PeerServer(backend, KEY, PeerLimits(max_concurrent_rpcs=1))
    await server.start("127.0.0.1", 0)
    address = server.blocks_address
    assert address is not None
    host, port = address.rsplit(":", 1)
    client = PeerClient(KEY)
    try:
        assert await client.get_prefix(address, [b"secret-hash"], bytes, 2.0) == [b"secret block"]
        # A newcomer takes the only place: the server drops the connection the client keeps.
        reader, writer = await asyncio.open_connection(host, int(port))
        await asyncio.sleep(0.1)
        assert await client.get_prefix(address, [b"secret-hash"], bytes, 2.0) == [b"secret block"]
        assert client.stats().errors == 0
        assert await asyncio.wait_for(reader.read(), 2.0) == b""  # and the newcomer went
        writer.close()
    finally:
        await client.close()
        await server.stop(0)


def test_limits_the_wire_cannot_carry_are_refused() -> None:
    for field, value in (("max_keys", 1 << 16), ("max_key_bytes", 1 << 16)):
        with pytest.raises(ValueError, match=field):
            PeerLimits(**{field: value})
    with pytest.raises(ValueError, match="max_value_bytes"):
        PeerLimits(max_value_bytes=0xFFFFFFFF)


# --- A hostile server -----------------------------------------------------------------------------

Answer = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def _values(*values: bytes) -> bytes:
    return b"".join(struct.pack(">I", len(v)) + v for v in values)


END = struct.pack(">I", 0xFFFFFFFF)


async def _then_close(writer: asyncio.StreamWriter, data: bytes) -> None:
    writer.write(data)
    await writer.drain()
    writer.close()


# What each answer sends for a request of two hashes, and what of it the client keeps.
HOSTILE: dict[str, tuple[bytes, list[bytes]]] = {
    "a value announced over the reader's limits": (b"\x00" + struct.pack(">I", 1 << 31), []),
    "no end, then a close": (b"\x00" + _values(b"good"), [b"good"]),
    "a value cut short": (b"\x00" + _values(b"good") + struct.pack(">I", 9) + b"ab", [b"good"]),
    "more values than hashes": (
        b"\x00" + _values(b"good", b"more", b"extra") + END,
        [b"good", b"more"],
    ),
    "a refusal": (b"\x02\x00\x04nope", []),
    "an unknown status": (b"\x7f" + _values(b"good") + END, []),
    "nothing, then a close": (b"", []),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
@pytest.mark.asyncio
async def test_a_malformed_answer_keeps_only_what_came_before_the_fault(case: str) -> None:
    sent, kept = HOSTILE[case]

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1)
        await _then_close(writer, sent)

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    address = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
    client = PeerClient(KEY, PeerLimits(max_value_bytes=1 << 20))
    try:
        assert await client.get_prefix(address, [b"h0", b"h1"], bytes, 2.0) == kept
        stats = client.stats()
        assert (stats.requests, stats.errors, stats.timeouts) == (1, 1, 0)
    finally:
        await client.close()
        server.close()


@pytest.mark.asyncio
async def test_a_value_the_decoder_refuses_ends_the_exchange() -> None:
    backend = CountingBackend()
    backend.blocks.update({b"h0": b"good", b"h1": b"forged", b"h2": b"good"})
    server = PeerServer(backend, KEY)
    await server.start("127.0.0.1", 0)
    assert server.blocks_address is not None
    client = PeerClient(KEY)
    decoded: list[bytes] = []

    def decode(value: bytes) -> bytes | None:
        decoded.append(value)
        return value if value == b"good" else None

    try:
        assert await client.get_prefix(server.blocks_address, [b"h0", b"h1", b"h2"], decode) == [
            b"good"
        ]
        assert decoded == [b"good", b"forged"]  # nothing after the refused one is decoded
        assert client.stats().errors == 1
    finally:
        await client.close()
        await server.stop(0)


@pytest.mark.asyncio
async def test_a_server_that_never_answers_is_a_miss_within_the_deadline() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(30)

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    address = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
    client = PeerClient(KEY)
    try:
        started = time.monotonic()
        assert await client.get_prefix(address, [b"h"], bytes, 0.2) == []
        assert time.monotonic() - started < 0.2 + SLACK_S
        assert client.stats().timeouts == 1
    finally:
        await client.close()
        server.close()
