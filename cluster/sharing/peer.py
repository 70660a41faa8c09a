"""The replica-to-replica fetch service: a grpc.aio server over a replica's caches, and its client.

Every replica runs a `PeerServer` over its local caches (a `PeerBackend`) and registers the
addresses it returns with the directory; other replicas fetch from, and store results to, the
owner of a key through one shared `PeerClient`. Values are codec envelopes (`cluster.codec`):
opaque bytes here, decoded as untrusted by whoever asked for them.

Two transports, one server and one client: results (small, latency-bound) and stores go over
gRPC (`address`); prefix blocks (MiBs) over a plain TCP stream (`blocks_address`,
`cluster.sharing.peer_blocks`), where they are not copied through protobuf and HTTP/2 frames.

Authentication (`cluster.sharing.peer_auth`): every call carries a one-time credential made from the
peer key of the cluster secret, in the metadata key `x-raycache-peer-auth` over gRPC. The check
runs in a server interceptor, which sees the method and the metadata before grpc reads the
request: a refused call fails with UNAUTHENTICATED without a byte of its request being read or
parsed, and is counted in `PeerServer.rejected_calls` (with the block stream's refusals). What
the credential does not give: it authenticates the call, not the bytes of its request, and the
channel is not encrypted. Someone who can read the traffic sees the values (signed envelopes,
not encrypted); someone who can also rewrite it could change a request in flight. Neither can
make calls of their own, and a value they alter fails its signature (`cluster.codec`).

Limits (`PeerLimits`): requests with too many keys, a key too long or a key repeated are refused
with INVALID_ARGUMENT before the backend is asked for anything; a message over
`max_message_bytes` is refused by grpc (RESOURCE_EXHAUSTED). Once authenticated, a call's handler
ends within `PeerLimits.server_deadline_s` (DEADLINE_EXCEEDED), however slow the backend.

A dead, slow or misbehaving peer is a miss, not an error: the client never raises for what a
peer does. Every call has an explicit deadline; a failed call returns all misses (or `False`)
and is counted in `PeerClientStats`. On the server, a backend that raises fails that one call
with INTERNAL and the server goes on serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, NoReturn, Protocol, TypeVar

import grpc
import grpc.aio

from cluster.sharing.peer_auth import (
    AUTH_WINDOW_S,
    NONCE_BYTES,
    CallAuthenticator,
    check_auth_key,
    peer_credential,
)
from cluster.sharing.peer_blocks import BlockStreamClient, BlockStreamServer, join_host_port
from cluster.sharing.peer_limits import DEFAULT_LIMITS, PeerLimits
from cluster.sharing.proto import peer_pb2, peer_pb2_grpc

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

_ENTRY_OVERHEAD: Final = 16  # an Entry's tags and length prefixes, bounded
_WILDCARD_HOSTS: Final = frozenset({"", "0.0.0.0", "::", "[::]"})
_MIN_PING_INTERVAL_MS: Final = 10_000  # the server's floor for its clients' keepalive pings

AUTH_METADATA_KEY: Final = "x-raycache-peer-auth"
"""The metadata key of a call's credential."""


class PeerBackend(Protocol):
    """What a replica offers its peers: its local caches, by key and by block hash.

    Any method may raise; the call that needed it then fails with INTERNAL, nothing more. Keys
    and hashes of one call are distinct.
    """

    async def get_results(self, keys: Sequence[str]) -> Sequence[bytes | None]:
        """The cached value of each key, in order; None where there is none."""
        ...

    async def get_prefix(self, hashes: Sequence[bytes]) -> Sequence[bytes]:
        """Values holding the cached blocks of the longest leading run of `hashes` (a chain's
        block hashes), in order, each for one or more consecutive blocks; empty when the first
        is not cached. At most one value per hash."""
        ...

    async def put_results(self, items: Sequence[tuple[str, bytes]]) -> None:
        """Store results that another replica computed (the cache may decline some)."""
        ...


# --- Credentials ---------------------------------------------------------------------------------


def method_path(name: str) -> str:
    """The gRPC path of the Peer service's method `name`, e.g. `/raycache.peer.v1.Peer/Ping`."""
    service = peer_pb2.DESCRIPTOR.services_by_name["Peer"]
    return f"/{service.full_name}/{service.methods_by_name[name].name}"


async def _refuse(request_iterator: object, context: grpc.aio.ServicerContext) -> NoReturn:
    await _abort(context, grpc.StatusCode.UNAUTHENTICATED, "peer call not authenticated")


# A request-streaming handler: grpc hands it the call without reading a request message.
_REFUSE: Final = grpc.stream_unary_rpc_method_handler(_refuse)


class _Authenticator(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Lets through only calls with a valid, fresh, unused credential for this server."""

    def __init__(self, check: CallAuthenticator, address: Callable[[], str | None]) -> None:
        self._check = check
        self._address = address

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = details.method
        if isinstance(method, bytes):
            method = method.decode("utf-8", "replace")
        credentials = [v for k, v in details.invocation_metadata or () if k == AUTH_METADATA_KEY]
        if self._check.refusal(str(method), self._address(), credentials) is None:
            return await continuation(details)
        return _REFUSE


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
        self._check = CallAuthenticator(auth_key, limits.replay_memory, clock)
        self._authenticator = _Authenticator(self._check, lambda: self._address)
        self._blocks = BlockStreamServer(backend.get_prefix, self._check, limits)
        self._server: Any = None
        self._address: str | None = None
        self._started = False

    @property
    def address(self) -> str | None:
        """`host:port` that peers should dial for results, once started; None before and after."""
        return self._address

    @property
    def blocks_address(self) -> str | None:
        """`host:port` that peers should dial for prefix blocks (`PeerClient.get_prefix`), once
        started; None before and after."""
        return self._blocks.address

    @property
    def rejected_calls(self) -> int:
        """Calls refused as unauthenticated since the server was made, on either transport."""
        return self._check.rejected

    async def start(
        self, host: str = "0.0.0.0", port: int = 0, advertise_host: str | None = None
    ) -> str:
        """Listen on `host:port` (0: a free port) and return the address to advertise; the
        block stream listens on a free port of the advertised host (see `blocks_address`).

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
            bound = server.add_insecure_port(join_host_port(host, port))
        except RuntimeError as exc:
            raise OSError(f"cannot listen on {join_host_port(host, port)}: {exc}") from exc
        if not bound:
            raise OSError(f"cannot listen on {join_host_port(host, port)}")
        self._address = join_host_port(advertise_host, bound)
        try:
            blocks_address = await self._blocks.start(advertise_host)
            await server.start()
        except BaseException:
            self._address = None
            await self._blocks.stop()
            await server.stop(0)
            raise
        self._started = True
        self._server = server
        _log.info(
            "peer server listening on %s:%d, advertised as %s (blocks at %s)",
            host,
            bound,
            self._address,
            blocks_address,
        )
        return self._address

    async def stop(self, grace_s: float = 1.0) -> None:
        """Stop accepting calls, let those in progress finish for `grace_s`, then cancel them."""
        self._address = None
        await self._blocks.stop()
        if self._server is not None:
            await self._server.stop(grace_s)
            self._server = None


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
    """Items that gets returned: results, and chunks of prefix blocks (not blocks)."""
    misses: int
    """Results that gets did not return (absent at the peer, malformed, or lost with their
    call), and prefix gets that returned nothing."""
    errors: int
    """Calls that failed other than by their deadline, or came back malformed in part."""
    timeouts: int
    """Calls that ran out of their deadline."""
    bytes_received: int
    """Value bytes that gets received."""
    latency_s: float
    """Wall time of all calls together."""


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
        self._auth_key = check_auth_key(auth_key)
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
        self._blocks = BlockStreamClient(auth_key, limits, clock=clock, nonce=nonce)
        self._requests = 0
        self._hits = 0
        self._misses = 0
        self._errors = 0
        self._timeouts = 0
        self._bytes_received = 0
        self._latency_s = 0.0

    @property
    def limits(self) -> PeerLimits:
        """The bounds this client keeps to, and expects its peers to keep to."""
        return self._limits

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

    async def get_prefix(
        self,
        address: str,
        hashes: Sequence[bytes],
        decode: Callable[[bytes], _T | None],
        timeout_s: float = 0.5,
    ) -> list[_T]:
        """What the peer whose `PeerServer.blocks_address` is `address` holds of the chain
        `hashes` (distinct, in chain order): each value it sends, as `decode` makes it (on the
        event loop, as it arrives; None refuses the value and ends the call). What was decoded
        before a failure is returned."""
        if not hashes:
            return []
        self._requests += 1
        started = self._timer()
        try:
            exchange = await self._blocks.get_prefix(address, hashes, timeout_s, decode)
        finally:
            self._latency_s += self._timer() - started
        if exchange.failure == "timeout":
            self._timeouts += 1
        elif exchange.failure is not None:
            self._errors += 1
        self._bytes_received += exchange.bytes_received
        self._hits += len(exchange.values)
        self._misses += not exchange.values
        return exchange.values

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
        """Close the channel to `address`, or the block connections to it when it is a
        `blocks_address` (a peer that left); a later call dials again."""
        entry = self._channels.pop(address, None)
        if entry is not None:
            await entry[0].close()
        await self._blocks.forget(address)

    async def close(self) -> None:
        """Close every channel; calls in progress fail (as misses)."""
        channels, self._channels = list(self._channels.values()), {}
        for channel, _stub in channels:
            await channel.close()
        await self._blocks.close()

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
            self._auth_key, _METHOD_PATHS[method], address, self._clock(), self._nonce(NONCE_BYTES)
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
