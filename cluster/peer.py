"""The replica-to-replica fetch service: a grpc.aio server over a replica's caches, and its client.

Every replica runs a `PeerServer` over its local caches (a `PeerBackend`) and registers the
address it returns with the directory; other replicas fetch from, and store results to, the owner
of a key through one shared `PeerClient`. Values are codec envelopes (`cluster.codec`): opaque
bytes here, decoded as untrusted by whoever asked for them.

Authentication: every call carries a one-time credential in its metadata, made from the peer key
of the cluster secret (`ClusterSecret.peer`), which every replica holds:

    x-raycache-peer-auth: <unix ms>.<nonce, 32 hex>.<mac, 64 hex>
    mac = BLAKE2b-256(key = peer key; method path, server address, unix ms, nonce)

The server accepts a call only when the MAC is right (compared in constant time), the time is
within `AUTH_WINDOW_S` of its own clock, and the nonce is new. It remembers the nonces it
accepted for as long as their time stays in the window, at most `PeerLimits.replay_memory` of
them; when that memory is full it forgets the oldest and from then on refuses any credential
that is not newer than the one it forgot, so a replay is refused either way. The server address
(as advertised) is in the MAC, so a credential seen going to one replica is no good at another.
The check runs in a server interceptor, which sees the method and the metadata before grpc reads
the request: a refused call fails with UNAUTHENTICATED without a byte of its request being read
or parsed, and is counted in `PeerServer.rejected_calls`. What the credential does not give: it
authenticates the call, not the bytes of its request, and the channel is not encrypted. Someone
who can read the traffic sees the values (signed envelopes, not encrypted); someone who can also
rewrite it could change a request in flight. Neither can make calls of their own, and a value
they alter fails its signature (`cluster.codec`).

Limits: requests over `PeerLimits` (too many keys, a key too long, a key repeated) are refused
with INVALID_ARGUMENT before the backend is asked for anything; a message over
`max_message_bytes` is refused by grpc (RESOURCE_EXHAUSTED). Once authenticated, a call's handler
ends within `PeerLimits.server_deadline_s` (DEADLINE_EXCEEDED), however slow the backend or the
reader of a stream.

Blocks stream: a batch of prefix blocks is cut into `BlockPiece`s (see `proto/peer.proto`) packed
into messages of at most `PeerLimits.chunk_bytes` of data, so values of many MiB travel in
pieces and small ones share a message; the reader reassembles them, and any piece sequence that
does not add up exactly is a miss of that item.

A dead, slow or misbehaving peer is a miss, not an error: the client never raises for what a
peer does. Every call has an explicit deadline; a failed call returns all misses (or `False`)
and is counted in `PeerClientStats`. On the server, a backend that raises fails that one call
with INTERNAL and the server goes on serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import secrets
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Final, NoReturn, Protocol, TypeVar

import grpc
import grpc.aio

from cluster.proto import peer_pb2, peer_pb2_grpc

__all__ = [
    "AUTH_METADATA_KEY",
    "AUTH_WINDOW_S",
    "DEFAULT_LIMITS",
    "PeerBackend",
    "PeerClient",
    "PeerClientStats",
    "PeerLimits",
    "PeerServer",
    "method_path",
    "peer_credential",
]

_log = logging.getLogger(__name__)
_T = TypeVar("_T")
_A = TypeVar("_A")

MiB: Final = 1024 * 1024
_ENTRY_OVERHEAD: Final = 16  # an Entry's tags and length prefixes, bounded
_PIECE_OVERHEAD: Final = 48  # a BlockPiece's tags, varints and length prefixes, bounded
_WILDCARD_HOSTS: Final = frozenset({"", "0.0.0.0", "::", "[::]"})
_MIN_PING_INTERVAL_MS: Final = 10_000  # the server's floor for its clients' keepalive pings

AUTH_METADATA_KEY: Final = "x-raycache-peer-auth"
"""The metadata key of a call's credential."""
AUTH_WINDOW_S: Final = 30.0
"""How far a credential's time may be from the server's clock, either way."""
_NONCE_BYTES: Final = 16
_MAC_BYTES: Final = 32
_MAC_PERSON: Final = b"raycache peer v1"  # BLAKE2b personalisation: this use of the key only
_MIN_KEY_BYTES: Final = 16
_MAX_KEY_BYTES: Final = 64  # BLAKE2b's longest key
_MAX_TIME_DIGITS: Final = 15  # unix ms until the year 33658; bounds int() of a hostile string


@dataclass(frozen=True)
class PeerLimits:
    """Bounds that the server and the client enforce; both sides default to the same values."""

    max_message_bytes: int = 8 * MiB
    """One gRPC message, sent or received (HTTP/2 frames of a stream are split below this)."""
    chunk_bytes: int = 1 * MiB
    """Value bytes per streamed message of blocks."""
    max_keys: int = 256
    """Keys or hashes in one request; more is INVALID_ARGUMENT."""
    max_key_bytes: int = 1024
    """Length of one key (UTF-8) or hash; longer is INVALID_ARGUMENT."""
    max_value_bytes: int = 64 * MiB
    """One result or block; a larger one is not sent (a miss) and not accepted."""
    max_batch_bytes: int = 256 * MiB
    """All values of one streamed batch: what a reader buffers before it hands the batch on."""
    max_concurrent_rpcs: int = 256
    """Server: calls in progress at once; beyond, RESOURCE_EXHAUSTED."""
    max_concurrent_streams: int = 128
    """Server: HTTP/2 streams of one client connection at once; beyond, they queue."""
    replay_memory: int = 1 << 16
    """Server: nonces of accepted credentials remembered (about 200 bytes each)."""
    server_deadline_s: float = 5.0
    """Server: the longest any call may take there, whatever the client's deadline."""

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            kinds = (int, float) if name == "server_deadline_s" else (int,)
            if not isinstance(value, kinds) or isinstance(value, bool) or not value > 0:
                raise ValueError(f"PeerLimits.{name} must be a positive number, got {value!r}")
        if 2 * self.chunk_bytes > self.max_message_bytes:
            raise ValueError(
                f"PeerLimits.chunk_bytes ({self.chunk_bytes}) must be at most half of "
                f"max_message_bytes ({self.max_message_bytes}), leaving room for framing"
            )


DEFAULT_LIMITS: Final = PeerLimits()


class PeerBackend(Protocol):
    """What a replica offers its peers: its local caches, by key and by block hash.

    Any method may raise; the call that needed it then fails with INTERNAL, nothing more. Keys
    and hashes of one call are distinct.
    """

    async def get_results(self, keys: Sequence[str]) -> Sequence[bytes | None]:
        """The cached value of each key, in order; None where there is none."""
        ...

    async def get_blocks(self, hashes: Sequence[bytes]) -> Sequence[bytes | None]:
        """The cached block of each hash, in order; None where there is none."""
        ...

    async def put_results(self, items: Sequence[tuple[str, bytes]]) -> None:
        """Store results that another replica computed (the cache may decline some)."""
        ...


# --- Credentials ---------------------------------------------------------------------------------


def method_path(name: str) -> str:
    """The gRPC path of the Peer service's method `name`, e.g. `/raycache.peer.v1.Peer/Ping`."""
    service = peer_pb2.DESCRIPTOR.services_by_name["Peer"]
    return f"/{service.full_name}/{service.methods_by_name[name].name}"


def _check_key(key: bytes) -> bytes:
    if not isinstance(key, bytes) or not _MIN_KEY_BYTES <= len(key) <= _MAX_KEY_BYTES:
        raise ValueError(
            f"the peer auth key must be {_MIN_KEY_BYTES} to {_MAX_KEY_BYTES} bytes "
            "(ClusterSecret.peer)"
        )
    return key


def _mac(key: bytes, method: str, address: str, unix_ms: int, nonce: bytes) -> bytes:
    message = f"{method}\n{address}\n{unix_ms}\n{nonce.hex()}".encode()
    return hashlib.blake2b(message, key=key, digest_size=_MAC_BYTES, person=_MAC_PERSON).digest()


def peer_credential(key: bytes, method: str, address: str, now_s: float, nonce: bytes) -> str:
    """The credential of one call of `method` (a path) to the server advertised as `address`.

    `now_s` is the caller's unix time; `nonce` is 16 random bytes, never used twice.
    """
    unix_ms = int(now_s * 1000)
    mac = _mac(key, method, address, unix_ms, nonce)
    return f"{unix_ms}.{nonce.hex()}.{mac.hex()}"


@dataclass(frozen=True)
class _Credential:
    unix_ms: int
    nonce: bytes
    mac: bytes


def _parse_credential(text: str) -> _Credential | None:
    """The parts of a credential, or None when it is not one."""
    parts = text.split(".")
    if len(parts) != 3:
        return None
    unix_ms, nonce, mac = parts
    if not (unix_ms.isascii() and unix_ms.isdigit() and len(unix_ms) <= _MAX_TIME_DIGITS):
        return None
    try:
        credential = _Credential(int(unix_ms), bytes.fromhex(nonce), bytes.fromhex(mac))
    except ValueError:
        return None
    if len(credential.nonce) != _NONCE_BYTES or len(credential.mac) != _MAC_BYTES:
        return None
    return credential


class _ReplayGuard:
    """The nonces accepted within the window, so that none is accepted twice.

    A nonce is forgotten when it leaves the window, or when the memory is full (the oldest);
    either way the floor rises to its time, and nothing at or below the floor is accepted again,
    so a forgotten nonce cannot come back, whatever the clock does later. The floor follows the
    credentials' times, not this server's clock: a clock that jumps ahead and back refuses
    calls only while it is wrong.
    """

    def __init__(self, capacity: int, window_s: float) -> None:
        self._capacity = capacity
        self._window_ms = window_s * 1000
        self._order: deque[tuple[int, bytes]] = deque()  # (unix ms, nonce), in the order accepted
        self._seen: set[bytes] = set()
        self._floor = -1

    def admit(self, nonce: bytes, unix_ms: int, now_ms: float) -> bool:
        """Whether this is the first use of `nonce` (remembering it if so)."""
        expired = now_ms - self._window_ms
        # Accepted in about time order: stop at the first one still in the window.
        while self._order and self._order[0][0] < expired:
            forgotten, oldest = self._order.popleft()
            self._seen.discard(oldest)
            self._floor = max(self._floor, forgotten)
        if unix_ms < expired or unix_ms <= self._floor or nonce in self._seen:
            return False
        if len(self._order) >= self._capacity:
            forgotten, oldest = self._order.popleft()
            self._seen.discard(oldest)
            self._floor = max(self._floor, forgotten)
            if unix_ms <= self._floor:
                return False
        self._order.append((unix_ms, nonce))
        self._seen.add(nonce)
        return True


async def _refuse(request_iterator: object, context: grpc.aio.ServicerContext) -> NoReturn:
    await _abort(context, grpc.StatusCode.UNAUTHENTICATED, "peer call not authenticated")


# A request-streaming handler: grpc hands it the call without reading a request message.
_REFUSE: Final = grpc.stream_unary_rpc_method_handler(_refuse)


class _Authenticator(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Lets through only calls with a valid, fresh, unused credential for this server."""

    def __init__(
        self, key: bytes, address: Callable[[], str | None], memory: int, clock: Callable[[], float]
    ) -> None:
        self._key = key
        self._address = address
        self._clock = clock
        self._guard = _ReplayGuard(memory, AUTH_WINDOW_S)
        self.rejected = 0

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        reason = self._refusal(details)
        if reason is None:
            return await continuation(details)
        self.rejected += 1
        # At the 1st, 2nd, 4th, 8th ... refusal: an attack shows in the log without flooding it.
        level = logging.WARNING if self.rejected & (self.rejected - 1) == 0 else logging.DEBUG
        _log.log(
            level, "peer call %.100r refused (%s); %d so far", details.method, reason, self.rejected
        )
        return _REFUSE

    def _refusal(self, details: grpc.HandlerCallDetails) -> str | None:
        """Why the call is refused; None when it is authenticated."""
        values = [v for k, v in details.invocation_metadata or () if k == AUTH_METADATA_KEY]
        if len(values) != 1 or not isinstance(values[0], str):
            return "no credential" if not values else "a malformed credential"
        credential = _parse_credential(values[0])
        if credential is None:
            return "a malformed credential"
        now_ms = self._clock() * 1000
        if abs(credential.unix_ms - now_ms) > AUTH_WINDOW_S * 1000:
            return "a credential outside the time window"
        address = self._address()
        method = details.method
        if isinstance(method, bytes):
            method = method.decode("utf-8", "replace")
        if address is None or not isinstance(method, str):
            return "the server is not serving"
        expected = _mac(self._key, method, address, credential.unix_ms, credential.nonce)
        if not hmac.compare_digest(expected, credential.mac):
            return "a wrong MAC"
        if not self._guard.admit(credential.nonce, credential.unix_ms, now_ms):
            return "a credential used before"
        return None


# --- Block pieces: cutting values up and putting them back together ---------------------------


def _pack_pieces(
    values: Sequence[bytes | None], chunk_bytes: int
) -> Iterator[list[peer_pb2.BlockPiece]]:
    """The pieces of `values`, grouped per message with at most `chunk_bytes` in each."""
    batch: list[peer_pb2.BlockPiece] = []
    size = 0
    for index, value in enumerate(values):
        total = len(value) if value is not None else 0
        offset = 0
        while True:
            if size >= chunk_bytes:
                yield batch
                batch, size = [], 0
            if value is None:
                batch.append(peer_pb2.BlockPiece(index=index))
                size += _PIECE_OVERHEAD
                break
            end = min(total, offset + chunk_bytes - size)
            # value[0:len] is value itself: a small block is not copied here.
            data = value[offset:end]
            batch.append(
                peer_pb2.BlockPiece(
                    index=index, found=True, total_size=total, offset=offset, data=data
                )
            )
            size += len(data) + _PIECE_OVERHEAD
            offset = end
            if offset >= total:
                break
    if batch:
        yield batch


class _Assembler:
    """Rebuilds the values of a batch of `count` items from their pieces, in any message split.

    A well-formed item is one piece with found = false (a miss) or contiguous pieces from offset
    0 that repeat one total_size and add up to it exactly. Anything else (an index out of range
    or seen twice, interleaved items, a gap or overlap, more bytes than declared, a declared
    size over the limits) makes that item a miss and sets `malformed`. Memory stays below
    `max_batch_bytes`: declared sizes are charged before any byte of them is kept.
    """

    def __init__(self, count: int, max_value_bytes: int, max_batch_bytes: int) -> None:
        self.values: list[bytes | None] = [None] * count
        self.malformed = False
        self.bytes_received = 0
        self._seen = [False] * count
        self._max_value_bytes = max_value_bytes
        self._batch_left = max_batch_bytes
        self._current = -1  # the item being assembled, if any
        self._parts: list[bytes] = []
        self._received = 0
        self._total = 0

    def add(self, piece: peer_pb2.BlockPiece) -> None:
        index = piece.index
        data = piece.data  # each read of a bytes field copies it: read it once
        if index == self._current:
            if not piece.found or piece.total_size != self._total or piece.offset != self._received:
                self._abandon()
                return
        else:
            if self._current >= 0:
                self._abandon()
            if index >= len(self.values) or self._seen[index]:
                self._reject(index)
                return
            self._seen[index] = True
            if not piece.found:
                if piece.total_size or piece.offset or data:
                    self.malformed = True
                return
            total = piece.total_size
            if piece.offset != 0 or total > self._max_value_bytes or total > self._batch_left:
                self.malformed = True
                return
            self._batch_left -= total
            self._current, self._parts, self._received, self._total = index, [], 0, total
        self._received += len(data)
        self.bytes_received += len(data)
        if self._received > self._total:
            self._abandon()
            return
        self._parts.append(data)
        if self._received == self._total:
            self.values[index] = self._parts[0] if len(self._parts) == 1 else b"".join(self._parts)
            self._current, self._parts = -1, []

    def finish(self) -> list[bytes | None]:
        """The values; None for every item that did not arrive complete and consistent."""
        if self._current >= 0:
            self._abandon()
        if not all(self._seen):
            self.malformed = True
        return self.values

    def _abandon(self) -> None:
        self.malformed = True
        self._current, self._parts = -1, []

    def _reject(self, index: int) -> None:
        self.malformed = True
        if index < len(self.values):
            self.values[index] = None


# --- Server ------------------------------------------------------------------------------------


class PeerServer:
    """Serves one replica's caches to its peers over grpc.aio; start once, stop once.

    `auth_key` is the cluster secret's peer key (`ClusterSecret.peer`): only calls whose
    credential was made with it are served. `clock` is the unix time that credentials are
    checked against.
    """

    def __init__(
        self,
        backend: PeerBackend,
        auth_key: bytes,
        limits: PeerLimits = DEFAULT_LIMITS,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._backend = backend
        self._limits = limits
        self._authenticator = _Authenticator(
            _check_key(auth_key), lambda: self._address, limits.replay_memory, clock
        )
        self._server: Any = None
        self._address: str | None = None
        self._started = False

    @property
    def address(self) -> str | None:
        """`host:port` that peers should dial, once started; None before and after."""
        return self._address

    @property
    def rejected_calls(self) -> int:
        """Calls refused as unauthenticated since the server was made."""
        return self._authenticator.rejected

    async def start(
        self, host: str = "0.0.0.0", port: int = 0, advertise_host: str | None = None
    ) -> str:
        """Listen on `host:port` (0: a free port) and return the address to advertise.

        Bind to the node's own address where possible; a wildcard `host` listens on every
        interface. The advertised host is `advertise_host` (the node's IP, as the caller knows
        it), or `host` when that is a specific address; a wildcard bind with no advertise_host is
        a ValueError, since no peer could dial `0.0.0.0`. Clients must dial exactly the
        advertised address: it is part of every credential. A port that is taken is an OSError.
        """
        if self._started:
            raise RuntimeError("a PeerServer starts once; make a new one to serve again")
        if advertise_host is None:
            if host in _WILDCARD_HOSTS:
                raise ValueError(
                    f"binding to {host!r} needs an advertise_host (this node's IP for peers)"
                )
            advertise_host = host
        limits = self._limits
        server = grpc.aio.server(
            interceptors=[self._authenticator],
            options=[
                ("grpc.max_send_message_length", limits.max_message_bytes),
                ("grpc.max_receive_message_length", limits.max_message_bytes),
                ("grpc.max_concurrent_streams", limits.max_concurrent_streams),
                # Without this, a second server may silently share an explicit port.
                ("grpc.so_reuseport", 0),
                # Accept the clients' keepalive pings on idle channels (see PeerClient).
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.min_recv_ping_interval_without_data_ms", _MIN_PING_INTERVAL_MS),
            ],
            maximum_concurrent_rpcs=limits.max_concurrent_rpcs,
        )
        peer_pb2_grpc.add_PeerServicer_to_server(  # type: ignore[no-untyped-call]
            _Servicer(self._backend, limits), server
        )
        try:
            bound = server.add_insecure_port(_join_host_port(host, port))
        except RuntimeError as exc:
            raise OSError(f"cannot listen on {_join_host_port(host, port)}: {exc}") from exc
        if not bound:
            raise OSError(f"cannot listen on {_join_host_port(host, port)}")
        self._address = _join_host_port(advertise_host, bound)
        await server.start()
        self._started = True
        self._server = server
        _log.info("peer server listening on %s:%d, advertised as %s", host, bound, self._address)
        return self._address

    async def stop(self, grace_s: float = 1.0) -> None:
        """Stop accepting calls, let those in progress finish for `grace_s`, then cancel them."""
        if self._server is not None:
            await self._server.stop(grace_s)
            self._server = None
        self._address = None


def _join_host_port(host: str, port: int) -> str:
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"


class _Servicer(peer_pb2_grpc.PeerServicer):
    """The gRPC side of PeerServer: checks requests, calls the backend, checks its answers.

    Only authenticated calls get here (see `_Authenticator`). Each runs within the server's
    deadline.
    """

    def __init__(self, backend: PeerBackend, limits: PeerLimits) -> None:
        self._backend = backend
        self._limits = limits

    async def GetResults(
        self, request: peer_pb2.GetResultsRequest, context: grpc.aio.ServicerContext
    ) -> peer_pb2.GetResultsResponse:
        async with self._deadline(context):
            await self._check_keys(context, request.keys)
            keys = list(request.keys)
            if not keys:
                return peer_pb2.GetResultsResponse()
            values = await self._backend_call(
                context, "get_results", self._backend.get_results, keys
            )
            await self._check_values(context, "get_results", values, len(keys))
        # A response over the message limit would fail as a whole: what does not fit is a miss.
        budget = self._limits.max_message_bytes - 64
        entries = []
        for value in values:
            size = _ENTRY_OVERHEAD + (len(value) if value is not None else 0)
            if value is None or len(value) > self._limits.max_value_bytes or size > budget:
                entries.append(peer_pb2.Entry())
                budget -= _ENTRY_OVERHEAD
            else:
                entries.append(peer_pb2.Entry(found=True, value=value))
                budget -= size
        return peer_pb2.GetResultsResponse(entries=entries)

    async def GetBlocks(
        self, request: peer_pb2.GetBlocksRequest, context: grpc.aio.ServicerContext
    ) -> None:
        # Written with context.write, not yielded: the deadline then covers every write, so a
        # reader that stops reading cannot hold the call open.
        async with self._deadline(context):
            await self._check_keys(context, request.hashes)
            hashes = list(request.hashes)
            if not hashes:
                return
            values = await self._backend_call(
                context, "get_blocks", self._backend.get_blocks, hashes
            )
            await self._check_values(context, "get_blocks", values, len(hashes))
            limit = self._limits.max_value_bytes
            sendable = [value if value is None or len(value) <= limit else None for value in values]
            for pieces in _pack_pieces(sendable, self._limits.chunk_bytes):
                await context.write(peer_pb2.BlockPieces(pieces=pieces))

    async def PutResults(
        self, request: peer_pb2.PutResultsRequest, context: grpc.aio.ServicerContext
    ) -> peer_pb2.PutAck:
        async with self._deadline(context):
            await self._check_keys(context, [item.key for item in request.items])
            items = [(item.key, item.value) for item in request.items]
            if any(len(value) > self._limits.max_value_bytes for _, value in items):
                await _abort(
                    context, grpc.StatusCode.INVALID_ARGUMENT, "a value over max_value_bytes"
                )
            if items:
                await self._backend_call(context, "put_results", self._backend.put_results, items)
        return peer_pb2.PutAck(stored=len(items))

    async def Ping(
        self, request: peer_pb2.PingRequest, context: grpc.aio.ServicerContext
    ) -> peer_pb2.PingResponse:
        return peer_pb2.PingResponse()

    @contextlib.asynccontextmanager
    async def _deadline(self, context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
        """Fail the call with DEADLINE_EXCEEDED once it has run for `server_deadline_s`."""
        seconds = self._limits.server_deadline_s
        try:
            async with asyncio.timeout(seconds):
                yield
        except TimeoutError:
            await _abort(
                context, grpc.StatusCode.DEADLINE_EXCEEDED, f"over the server's {seconds} s limit"
            )

    async def _check_keys(
        self, context: grpc.aio.ServicerContext, keys: Sequence[str] | Sequence[bytes]
    ) -> None:
        """INVALID_ARGUMENT unless the keys are few enough, short enough and distinct."""
        limits = self._limits
        if len(keys) > limits.max_keys:
            await _abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{len(keys)} keys in one request; at most {limits.max_keys}",
            )
        encoded = [key.encode() if isinstance(key, str) else key for key in keys]
        if any(len(key) > limits.max_key_bytes for key in encoded):
            await _abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"a key or hash longer than {limits.max_key_bytes} bytes",
            )
        if len(set(encoded)) != len(encoded):
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, "a key or hash repeated")

    async def _backend_call(
        self,
        context: grpc.aio.ServicerContext,
        name: str,
        method: Callable[[_A], Awaitable[_T]],
        argument: _A,
    ) -> _T:
        try:
            return await method(argument)
        except Exception:
            _log.warning("peer backend %s failed", name, exc_info=True)
            await _abort(context, grpc.StatusCode.INTERNAL, f"backend {name} failed")

    async def _check_values(
        self, context: grpc.aio.ServicerContext, name: str, values: object, count: int
    ) -> None:
        if (
            not isinstance(values, Sequence)
            or len(values) != count
            or not all(value is None or isinstance(value, bytes) for value in values)
        ):
            _log.warning("peer backend %s answered %d keys with %.200r", name, count, values)
            await _abort(context, grpc.StatusCode.INTERNAL, f"backend {name} answered badly")


async def _abort(
    context: grpc.aio.ServicerContext, code: grpc.StatusCode, details: str
) -> NoReturn:
    await context.abort(code, details)
    raise AssertionError("unreachable: ServicerContext.abort raises")  # pragma: no cover


# --- Client ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PeerClientStats:
    """A snapshot of a PeerClient's counters since it was made."""

    requests: int
    """Calls attempted: gets, puts and pings."""
    hits: int
    """Items that gets returned."""
    misses: int
    """Items that gets did not return: absent at the peer, malformed, or lost with their call."""
    errors: int
    """Calls that failed other than by their deadline, or came back malformed in part."""
    timeouts: int
    """Calls that ran out of their deadline."""
    bytes_received: int
    """Value bytes that gets received."""
    latency_s: float
    """Wall time of all calls together."""

    @property
    def mean_latency_s(self) -> float:
        """Mean wall time of a call; 0.0 before the first."""
        return self.latency_s / self.requests if self.requests else 0.0


class PeerClient:
    """Calls other replicas' PeerServers; one cached channel per peer address.

    Never raises for what a peer does: every failure is a miss (or False), counted in `stats()`.
    Use it from one event loop (grpc.aio channels belong to the loop that made them).
    `auth_key` is the cluster secret's peer key (`ClusterSecret.peer`); every call carries a
    fresh credential made with it for the address dialled, which must be the one the server
    advertised. `keepalive_s` is how often an idle channel pings its peer; servers refuse pings
    more often than every 10 s, so it may not be less. `timer` measures latency; `clock` is the
    unix time that credentials carry; `nonce` makes their 16 random bytes.
    """

    def __init__(
        self,
        auth_key: bytes,
        limits: PeerLimits = DEFAULT_LIMITS,
        *,
        keepalive_s: float = 20.0,
        timer: Callable[[], float] = time.perf_counter,
        clock: Callable[[], float] = time.time,
        nonce: Callable[[int], bytes] = secrets.token_bytes,
    ) -> None:
        if keepalive_s < _MIN_PING_INTERVAL_MS / 1000:
            raise ValueError(f"keepalive_s must be at least 10 (seconds), got {keepalive_s!r}")
        self._auth_key = _check_key(auth_key)
        self._limits = limits
        self._timer = timer
        self._clock = clock
        self._nonce = nonce
        self._options = [
            ("grpc.max_send_message_length", limits.max_message_bytes),
            ("grpc.max_receive_message_length", limits.max_message_bytes),
            # Find a vanished peer on an idle channel, so its next call fails fast.
            ("grpc.keepalive_time_ms", int(keepalive_s * 1000)),
            ("grpc.keepalive_timeout_ms", 5_000),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),
            # A restarted peer is dialled again within seconds, not grpc's default two minutes.
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 2_000),
        ]
        self._channels: dict[str, tuple[Any, Any]] = {}
        self._requests = 0
        self._hits = 0
        self._misses = 0
        self._errors = 0
        self._timeouts = 0
        self._bytes_received = 0
        self._latency_s = 0.0

    async def get_results(
        self, address: str, keys: Sequence[str], timeout_s: float = 0.2
    ) -> list[bytes | None]:
        """The value of each key at the peer, in order; None for a miss."""
        if not keys:
            return []
        asked = _distinct(keys)
        request = peer_pb2.GetResultsRequest(keys=asked)
        response = await self._call(address, "GetResults", request, timeout_s)
        values: list[bytes | None] = [None] * len(asked)
        if response is not None:
            if len(response.entries) == len(asked):
                for i, entry in enumerate(response.entries):
                    value = entry.value  # each read of a bytes field copies it
                    if entry.found and len(value) <= self._limits.max_value_bytes:
                        values[i] = value
                        self._bytes_received += len(value)
            else:
                entries = len(response.entries)
                _log.debug("peer %s answered %d keys with %d entries", address, len(asked), entries)
                self._errors += 1
        return self._count_items(_spread(keys, asked, values))

    async def get_blocks(
        self, address: str, hashes: Sequence[bytes], timeout_s: float = 0.5
    ) -> list[bytes | None]:
        """The block of each hash at the peer, in order; None for a miss.

        The blocks arrive streamed in pieces and are reassembled here; a failed call (even one
        that failed after some blocks arrived) returns all misses.
        """
        if not hashes:
            return []
        asked = _distinct(hashes)
        limits = self._limits
        assembler = _Assembler(len(asked), limits.max_value_bytes, limits.max_batch_bytes)

        async def receive(stub: Any) -> _Assembler:
            async for message in stub.GetBlocks(
                peer_pb2.GetBlocksRequest(hashes=asked),
                timeout=timeout_s,
                metadata=self._credential(address, "GetBlocks"),
            ):
                for piece in message.pieces:
                    assembler.add(piece)
            return assembler

        values: list[bytes | None] = [None] * len(asked)
        if await self._run(address, receive) is not None:
            values = assembler.finish()
            if assembler.malformed:
                _log.debug("peer %s streamed malformed blocks", address)
                self._errors += 1
        self._bytes_received += assembler.bytes_received
        return self._count_items(_spread(hashes, asked, values))

    async def put_results(
        self, address: str, items: Sequence[tuple[str, bytes]], timeout_s: float = 1.0
    ) -> bool:
        """Ask the peer to store these results; True when it acknowledged all of them.

        Of a key given twice, the last value is sent.
        """
        if not items:
            return True
        distinct = dict(items)
        request = peer_pb2.PutResultsRequest(
            items=[peer_pb2.ResultItem(key=key, value=value) for key, value in distinct.items()]
        )
        ack = await self._call(address, "PutResults", request, timeout_s)
        return ack is not None and ack.stored == len(distinct)

    async def ping(self, address: str, timeout_s: float = 0.2) -> bool:
        """Whether the peer answers within `timeout_s`."""
        return await self._call(address, "Ping", peer_pb2.PingRequest(), timeout_s) is not None

    def stats(self) -> PeerClientStats:
        """The counters now."""
        return PeerClientStats(
            requests=self._requests,
            hits=self._hits,
            misses=self._misses,
            errors=self._errors,
            timeouts=self._timeouts,
            bytes_received=self._bytes_received,
            latency_s=self._latency_s,
        )

    async def forget(self, address: str) -> None:
        """Close the channel to `address` (a peer that left); a later call dials again."""
        entry = self._channels.pop(address, None)
        if entry is not None:
            await entry[0].close()

    async def close(self) -> None:
        """Close every channel; calls in progress fail (as misses)."""
        channels, self._channels = list(self._channels.values()), {}
        for channel, _stub in channels:
            await channel.close()

    async def _call(self, address: str, method: str, request: Any, timeout_s: float) -> Any:
        """A unary call; its response, or None when it failed."""

        async def call(stub: Any) -> Any:
            return await getattr(stub, method)(
                request, timeout=timeout_s, metadata=self._credential(address, method)
            )

        return await self._run(address, call)

    async def _run(self, address: str, call: Callable[[Any], Awaitable[_T]]) -> _T | None:
        """Run `call` on the stub of `address`; its result, or None when it failed (counted)."""
        self._requests += 1
        started = self._timer()
        try:
            result = await call(self._stub(address))
            if result is None:  # grpc hands over None for a message it could not parse
                raise ValueError("a response that is no message of its type")
            return result
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                self._timeouts += 1
            else:
                self._errors += 1
            _log.debug("peer %s: %s %s", address, exc.code(), exc.details())
            return None
        except Exception:  # a malformed message, a channel closed under the call, ...
            self._errors += 1
            _log.debug("peer %s: call failed", address, exc_info=True)
            return None
        finally:
            self._latency_s += self._timer() - started

    def _stub(self, address: str) -> Any:
        entry = self._channels.get(address)
        if entry is None:
            channel = grpc.aio.insecure_channel(address, options=self._options)
            entry = (channel, peer_pb2_grpc.PeerStub(channel))  # type: ignore[no-untyped-call]
            self._channels[address] = entry
        return entry[1]

    def _credential(self, address: str, method: str) -> tuple[tuple[str, str], ...]:
        """The metadata of one call of `method` (a name) to `address`."""
        credential = peer_credential(
            self._auth_key, _METHOD_PATHS[method], address, self._clock(), self._nonce(_NONCE_BYTES)
        )
        return ((AUTH_METADATA_KEY, credential),)

    def _count_items(self, values: list[bytes | None]) -> list[bytes | None]:
        hits = sum(value is not None for value in values)
        self._hits += hits
        self._misses += len(values) - hits
        return values


_METHOD_PATHS: Final = {
    method.name: method_path(method.name)
    for method in peer_pb2.DESCRIPTOR.services_by_name["Peer"].methods
}

_K = TypeVar("_K", str, bytes)


def _distinct(keys: Sequence[_K]) -> list[_K]:
    """`keys` without repeats, in first-seen order (servers refuse a request with repeats)."""
    return list(dict.fromkeys(keys))


def _spread(
    keys: Sequence[_K], asked: Sequence[_K], values: list[bytes | None]
) -> list[bytes | None]:
    """The value of each of `keys`, from the values of the distinct keys `asked`."""
    if len(asked) == len(keys):
        return values
    found = dict(zip(asked, values, strict=True))
    return [found[key] for key in keys]
