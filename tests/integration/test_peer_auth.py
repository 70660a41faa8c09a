"""The peer port against a caller without the cluster secret, over real grpc.aio on loopback.

An attacker who can reach the port but lacks the peer key must get UNAUTHENTICATED from every
RPC, with no data returned and nothing stored; a peer with the key is served. The server's
limits (repeated keys, its own deadline) hold for authenticated callers too. The block stream,
the other port of the same server, is attacked in `test_peer_blocks.py`.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

import grpc
import grpc.aio
import pytest
import pytest_asyncio

from cluster.secret import ClusterSecret
from cluster.sharing.peer import (
    AUTH_METADATA_KEY,
    AUTH_WINDOW_S,
    PeerClient,
    PeerLimits,
    PeerServer,
    method_path,
    peer_credential,
)
from cluster.sharing.proto import peer_pb2, peer_pb2_grpc
from tests.support.prefix_runs import leading_run

pytestmark = pytest.mark.integration

KEY = ClusterSecret.generate().peer
SLACK_S = 0.5  # scheduling noise on a loaded 2-core machine

Metadata = tuple[tuple[str, str], ...]


class CountingBackend:
    """A PeerBackend over two dicts that counts the calls that reach it."""

    def __init__(self) -> None:
        self.results: dict[str, bytes] = {"secret-key": b"secret answer"}
        self.blocks: dict[bytes, bytes] = {b"secret-hash": b"secret block"}
        self.calls = 0
        self.delay_s = 0.0

    async def get_results(self, keys: Sequence[str]) -> list[bytes | None]:
        self.calls += 1
        await asyncio.sleep(self.delay_s)
        return [self.results.get(key) for key in keys]

    async def get_prefix(self, hashes: Sequence[bytes]) -> list[bytes]:
        self.calls += 1
        await asyncio.sleep(self.delay_s)
        return leading_run(self.blocks, hashes)

    async def put_results(self, items: Sequence[tuple[str, bytes]]) -> None:
        self.calls += 1
        self.results.update(items)


@dataclass
class Served:
    server: PeerServer
    backend: CountingBackend
    address: str


@pytest_asyncio.fixture
async def served() -> AsyncIterator[Served]:
    backend = CountingBackend()
    server = PeerServer(backend, KEY, PeerLimits(server_deadline_s=0.3))
    address = await server.start("127.0.0.1", 0)
    yield Served(server, backend, address)
    await server.stop(0)


@pytest_asyncio.fixture
async def channel(served: Served) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(served.address) as channel:
        yield channel


def _credential(
    method: str, address: str, key: bytes = KEY, skew_s: float = 0.0, nonce: bytes | None = None
) -> Metadata:
    nonce = nonce if nonce is not None else secrets.token_bytes(16)
    text = peer_credential(key, method_path(method), address, time.time() + skew_s, nonce)
    return ((AUTH_METADATA_KEY, text),)


async def _call_each_rpc(stub: peer_pb2_grpc.PeerStub, metadata: Callable[[str], Metadata]) -> None:
    """Call every RPC as an attacker would; each must fail UNAUTHENTICATED with no data."""
    calls = {
        "GetResults": lambda md: stub.GetResults(
            peer_pb2.GetResultsRequest(keys=["secret-key"]), timeout=2.0, metadata=md
        ),
        "PutResults": lambda md: stub.PutResults(
            peer_pb2.PutResultsRequest(items=[peer_pb2.ResultItem(key="planted", value=b"x")]),
            timeout=2.0,
            metadata=md,
        ),
        "Ping": lambda md: stub.Ping(peer_pb2.PingRequest(), timeout=2.0, metadata=md),
    }
    for method, call in calls.items():
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await call(metadata(method))
        assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED, method


def _attacks(address: str) -> dict[str, Callable[[str], Metadata]]:
    other_key = ClusterSecret.generate().peer
    host, port = address.rsplit(":", 1)
    return {
        "no credential": lambda method: (),
        "a credential made with another key": lambda method: _credential(
            method, address, key=other_key
        ),
        "a stale credential": lambda method: _credential(
            method, address, skew_s=-(AUTH_WINDOW_S + 5)
        ),
        "a credential from the future": lambda method: _credential(
            method, address, skew_s=AUTH_WINDOW_S + 5
        ),
        "a credential for another method": lambda method: _credential(
            "Ping" if method != "Ping" else "GetResults", address
        ),
        "a credential for another server": lambda method: _credential(
            method, f"{host}:{int(port) + 1}"
        ),
        "a malformed credential": lambda method: ((AUTH_METADATA_KEY, "1.2.3"),),
        "two credentials": lambda method: _credential(method, address) * 2,
    }


ATTACKS = sorted(_attacks("127.0.0.1:1"))


@pytest.mark.parametrize("attack", ATTACKS)
@pytest.mark.asyncio
async def test_a_caller_without_a_valid_credential_is_refused_on_every_rpc(
    served: Served, channel: grpc.aio.Channel, attack: str
) -> None:
    await _call_each_rpc(peer_pb2_grpc.PeerStub(channel), _attacks(served.address)[attack])
    assert served.server.rejected_calls == 3
    assert served.backend.calls == 0
    assert "planted" not in served.backend.results


@pytest.mark.asyncio
async def test_a_replayed_credential_is_refused(served: Served, channel: grpc.aio.Channel) -> None:
    stub = peer_pb2_grpc.PeerStub(channel)
    seen: dict[str, Metadata] = {}

    def captured(method: str) -> Metadata:
        return seen[method]

    # What an observer on the network saw: one genuine call of each RPC, served.
    for method in ("GetResults", "PutResults", "Ping"):
        seen[method] = _credential(method, served.address)
    request = peer_pb2.GetResultsRequest(keys=["secret-key"])
    assert (await stub.GetResults(request, metadata=seen["GetResults"])).entries[0].found
    item = peer_pb2.ResultItem(key="genuine", value=b"v")
    put = peer_pb2.PutResultsRequest(items=[item])
    assert (await stub.PutResults(put, metadata=seen["PutResults"])).stored == 1
    await stub.Ping(peer_pb2.PingRequest(), metadata=seen["Ping"])
    calls = served.backend.calls

    await _call_each_rpc(stub, captured)
    assert served.server.rejected_calls == 3
    assert served.backend.calls == calls


@pytest.mark.asyncio
async def test_a_refused_call_is_answered_before_its_request_is_read(
    served: Served, channel: grpc.aio.Channel
) -> None:
    async def never_sent() -> AsyncIterator[bytes]:
        await asyncio.sleep(60)
        yield b""

    # A unary method called as a stream whose one message never comes: a server that read the
    # request before checking would wait here until the client's deadline.
    for method in ("PutResults", "GetResults", "PutBlocks", "NoSuchMethod"):
        call = channel.stream_unary(method_path("Ping").replace("Ping", method))
        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await call(never_sent(), timeout=5.0)
        assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED, method
        assert time.monotonic() - started < SLACK_S
    assert served.server.rejected_calls == 4


@pytest.mark.asyncio
async def test_put_blocks_is_gone(served: Served, channel: grpc.aio.Channel) -> None:
    call = channel.stream_unary(method_path("Ping").replace("Ping", "PutBlocks"))
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call(iter([b""]), timeout=2.0, metadata=_credential("Ping", served.address))
    assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED  # the MAC names the method
    path = method_path("Ping").replace("Ping", "PutBlocks")
    credential = peer_credential(KEY, path, served.address, time.time(), secrets.token_bytes(16))
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call(iter([b""]), timeout=2.0, metadata=((AUTH_METADATA_KEY, credential),))
    assert raised.value.code() == grpc.StatusCode.UNIMPLEMENTED


@pytest.mark.asyncio
async def test_a_peer_with_the_key_is_served_and_one_without_gets_misses(served: Served) -> None:
    right, wrong = PeerClient(KEY), PeerClient(ClusterSecret.generate().peer)
    blocks_address = served.server.blocks_address
    assert blocks_address is not None
    try:
        address = served.address
        assert await right.get_results(address, ["secret-key"], 2.0) == [b"secret answer"]
        assert await right.get_prefix(blocks_address, [b"secret-hash"], bytes, 2.0) == [
            b"secret block"
        ]
        assert await right.put_results(address, [("k", b"v")], 2.0)
        assert await right.ping(address, 2.0)
        assert right.stats().errors == 0 and served.server.rejected_calls == 0

        assert await wrong.get_results(address, ["secret-key"], 2.0) == [None]
        assert await wrong.get_prefix(blocks_address, [b"secret-hash"], bytes, 2.0) == []
        assert not await wrong.put_results(address, [("planted", b"x")], 2.0)
        assert not await wrong.ping(address, 2.0)
        assert wrong.stats().errors == 4 and served.server.rejected_calls == 4
        assert "planted" not in served.backend.results
    finally:
        await right.close()
        await wrong.close()


@pytest.mark.asyncio
async def test_clocks_may_differ_by_less_than_the_window(served: Served) -> None:
    def skewed(seconds: float) -> Callable[[], float]:
        return lambda: time.time() + seconds

    ahead, behind = PeerClient(KEY, clock=skewed(20)), PeerClient(KEY, clock=skewed(-20))
    too_far = PeerClient(KEY, clock=skewed(AUTH_WINDOW_S + 10))
    try:
        assert await ahead.ping(served.address, 2.0) and await behind.ping(served.address, 2.0)
        assert not await too_far.ping(served.address, 2.0)
        assert served.server.rejected_calls == 1
    finally:
        for client in (ahead, behind, too_far):
            await client.close()


@pytest.mark.asyncio
async def test_the_credential_names_the_advertised_address(served: Served) -> None:
    server = PeerServer(served.backend, KEY)
    address = await server.start("0.0.0.0", 0, advertise_host="127.0.0.1")
    client = PeerClient(KEY)
    try:
        assert await client.ping(address, 2.0)
        # The same server dialled under another name: the credential is for another address.
        assert not await client.ping(address.replace("127.0.0.1", "localhost"), 2.0)
        assert server.rejected_calls == 1
    finally:
        await client.close()
        await server.stop(0)


def test_the_key_is_required() -> None:
    backend = CountingBackend()
    for key in (b"", bytes(15), bytes(65), "a key given as text, not bytes"):
        with pytest.raises(ValueError, match="peer auth key"):
            PeerServer(backend, key)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="peer auth key"):
            PeerClient(key)  # type: ignore[arg-type]


# --- Limits, for callers with the key ----------------------------------------------------------


@pytest.mark.asyncio
async def test_repeated_keys_are_refused_before_the_backend_is_asked(
    served: Served, channel: grpc.aio.Channel
) -> None:
    stub = peer_pb2_grpc.PeerStub(channel)
    item = peer_pb2.ResultItem(key="k", value=b"v")
    calls = {
        "GetResults": lambda md: stub.GetResults(
            peer_pb2.GetResultsRequest(keys=["a", "b", "a"]), timeout=2.0, metadata=md
        ),
        "PutResults": lambda md: stub.PutResults(
            peer_pb2.PutResultsRequest(items=[item, item]), timeout=2.0, metadata=md
        ),
    }
    for method, call in calls.items():
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await call(_credential(method, served.address))
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT, method
        assert "repeated" in (raised.value.details() or "")
    assert served.backend.calls == 0 and served.server.rejected_calls == 0


@pytest.mark.asyncio
async def test_a_slow_backend_is_cut_off_by_the_servers_deadline(
    served: Served, channel: grpc.aio.Channel
) -> None:
    served.backend.delay_s = 30.0
    stub = peer_pb2_grpc.PeerStub(channel)
    started = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.GetResults(
            peer_pb2.GetResultsRequest(keys=["secret-key"]),
            timeout=10.0,  # the client would wait: the server does not
            metadata=_credential("GetResults", served.address),
        )
    assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 0.3 + SLACK_S
