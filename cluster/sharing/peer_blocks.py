"""Prefix blocks between peers over a plain TCP stream: the bulk half of the peer service.

A prompt's blocks are MiBs at once. Through gRPC each block was copied several times on either
side (protobuf fields, HTTP/2 frames, reassembly of pieces) and arrived at 0.43-0.58 of the rate
the same bytes reach over a plain loopback socket (`benchmarks.peer_fetch`); here they go to the
socket as they are and are read back with one copy. Results, small and latency-bound, stay on
the gRPC service (`cluster.sharing.peer`), which owns this server and client.

One request per exchange, on a connection the client keeps open for its next one. The client
names the chain of block hashes it wants; the server answers with the longest leading run of
them that it holds, as values of its own making (`PeerBackend.get_prefix`: signed chunks of
consecutive blocks, so that the reader verifies one envelope per chunk, not per block, and
decodes each chunk while the next is arriving):

    request  = b"RCPB" | u8 version (1) | u16 count | u32 body bytes | u8 credential length
               | credential (ASCII) | body: `count` times (u16 length, hash)
    response = u8 status, then for status OK: (u32 length, value) at most `count` times, ended
               by a length of 0xFFFFFFFF; for any other status: u16 length, reason (UTF-8),
               after which the server closes the connection.

The credential (`cluster.sharing.peer_auth`, shared with the gRPC service, so a nonce counts once
across both) names the method `blocks.get/<count>/<body bytes>`: it authenticates the caller and the
size of its request before a byte of the body is read, and the body is bounded by the limits before
it is. Like a gRPC call's credential it does not cover the hashes asked for; a chunk is bound to its
hashes by its signed envelope, checked by the receiver (`cluster.sharing.tiered_prefix`).

Limits (`PeerLimits`): at most `max_keys` hashes of at most `max_key_bytes`, distinct; no value
over `max_value_bytes`, nor more than `max_batch_bytes` in one answer (the server sends what
fits; a reader refuses a value announced over them before reading it); each exchange ends within
`server_deadline_s` on the server, however slow the backend or the reader; a connection is
closed when it sends no first request within that deadline, or no next one within
`IDLE_TIMEOUT_S`; at most `max_concurrent_rpcs` connections are served at once, a newcomer
taking the place of the one that waited longest. The client never raises for what a peer does:
a failed exchange keeps what was verified before it failed, and its connection is closed rather
than reused.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import struct
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Final, Generic, TypeVar

from cluster.sharing.peer_auth import (
    NONCE_BYTES,
    CallAuthenticator,
    check_auth_key,
    peer_credential,
)
from cluster.sharing.peer_limits import PeerLimits

__all__ = [
    "IDLE_TIMEOUT_S",
    "BlockStreamClient",
    "BlockStreamServer",
    "PrefixExchange",
    "Status",
    "encode_request",
    "join_host_port",
]

_log = logging.getLogger(__name__)
_T = TypeVar("_T")

MAGIC: Final = b"RCPB"
VERSION: Final = 1
_HEADER: Final = struct.Struct(">4sBHIB")  # magic, version, count, body bytes, credential length
_HASH_LENGTH: Final = struct.Struct(">H")
_VALUE_LENGTH: Final = struct.Struct(">I")
_REASON_LENGTH: Final = struct.Struct(">H")
END: Final = 0xFFFFFFFF
_COALESCE_BELOW: Final = 16 * 1024  # smaller values share one write; larger go out uncopied
_MAX_IDLE_CONNECTIONS: Final = 4  # per peer, kept open by a client
# A reader's buffer bound: asyncio stops reading at twice it and starts again once a read drains
# it, so a value much larger than the bound arrives in many pauses (the default, 64 KiB, halves
# the rate of 1 MiB values).
_READ_BUFFER_BYTES: Final = 4 * 1024 * 1024
# How much a server's answer may hold in its buffers before it waits for the reader: enough to
# keep the socket busy, little enough that a slow reader costs little memory.
_WRITE_BUFFER_BYTES: Final = 4 * 1024 * 1024
IDLE_TIMEOUT_S: Final = 60.0
"""How long a server keeps a connection that sends no request."""


class Status(IntEnum):
    OK = 0
    UNAUTHENTICATED = 1
    INVALID_ARGUMENT = 2
    INTERNAL = 3


def method_name(count: int, body_bytes: int) -> str:
    """What a block request's credential names: the call and the size of its request."""
    return f"blocks.get/{count}/{body_bytes}"


def encode_request(
    key: bytes, address: str, hashes: Sequence[bytes], now_s: float, nonce: bytes
) -> bytes:
    """The request for `hashes` (at most 65,535, each at most 65,535 bytes) to the server
    advertised as `address`, with a credential made from the peer `key` at unix time `now_s`
    with the fresh 16-byte `nonce`."""
    body = b"".join(_HASH_LENGTH.pack(len(h)) + h for h in hashes)
    method = method_name(len(hashes), len(body))
    credential = peer_credential(key, method, address, now_s, nonce).encode()
    header = _HEADER.pack(MAGIC, VERSION, len(hashes), len(body), len(credential))
    return header + credential + body


class _Refused(Exception):
    """An exchange the server answers with `status` and `reason`, then hangs up on."""

    def __init__(self, status: Status, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


GetPrefix = Callable[[Sequence[bytes]], Awaitable[Sequence[bytes]]]


class BlockStreamServer:
    """Serves `get_prefix` (a `PeerBackend`'s) to peers whose calls `authenticator` admits."""

    def __init__(
        self, get_prefix: GetPrefix, authenticator: CallAuthenticator, limits: PeerLimits
    ) -> None:
        self._get_prefix = get_prefix
        self._authenticator = authenticator
        self._limits = limits
        self._server: asyncio.Server | None = None
        self._address: str | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        # Connections waiting for a request: whether one was served on them, and since when.
        self._waiting: dict[asyncio.Task[None], tuple[bool, float]] = {}
        self._cancelled: set[asyncio.Task[None]] = set()

    @property
    def address(self) -> str | None:
        """`host:port` that peers should dial, once started; None before and after."""
        return self._address

    async def start(self, host: str) -> str:
        """Listen on a free port of `host`, the address peers dial (not a wildcard: one socket,
        on the node's own address); return `host:port`."""
        self._server = await asyncio.start_server(self._serve, host.strip("[]"), 0)
        port = self._server.sockets[0].getsockname()[1]
        self._address = join_host_port(host, port)
        return self._address

    async def stop(self) -> None:
        """Stop listening and close every connection (exchanges in progress end)."""
        self._address = None
        if self._server is not None:
            self._server.close()
            self._server = None
        for handler in list(self._handlers):
            self._cancel(handler)
        if self._handlers:
            await asyncio.gather(*self._handlers, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handler = asyncio.current_task()
        assert handler is not None
        if len(self._handlers) >= self._limits.max_concurrent_rpcs and not self._evict_waiting():
            writer.transport.abort()
            return
        self._handlers.add(handler)
        writer.transport.set_write_buffer_limits(high=_WRITE_BUFFER_BYTES)
        served = False
        try:
            while True:
                # Until a request was served, a connection gets no longer than an exchange, and
                # until its credential is in, it may be closed for a newcomer: connections that
                # say nothing, or not who they are, cannot hold the server's places for long.
                wait_s = IDLE_TIMEOUT_S if served else self._limits.server_deadline_s
                self._waiting[handler] = (served, time.monotonic())
                try:
                    async with asyncio.timeout(wait_s):
                        header = await reader.readexactly(_HEADER.size)
                        # At most 255 bytes (a u8 says how many): the check refuses what it is not.
                        credential = await reader.readexactly(header[-1])
                except (asyncio.IncompleteReadError, TimeoutError):
                    return  # the client hung up, or sent nothing in time
                finally:
                    self._waiting.pop(handler, None)
                try:
                    async with asyncio.timeout(self._limits.server_deadline_s):
                        await self._exchange(header, credential, reader, writer)
                except _Refused as refused:
                    reason = refused.reason.encode()[:1024].decode(errors="ignore").encode()
                    writer.write(
                        bytes([refused.status]) + _REASON_LENGTH.pack(len(reason)) + reason
                    )
                    with contextlib.suppress(TimeoutError, ConnectionError):
                        async with asyncio.timeout(1.0):
                            await writer.drain()
                    return
                served = True
        except (TimeoutError, ConnectionError, asyncio.IncompleteReadError):
            return  # over the deadline, or the client went away mid-exchange
        except asyncio.CancelledError:
            if handler not in self._cancelled:
                raise
        finally:
            self._handlers.discard(handler)
            self._cancelled.discard(handler)
            # Not close(): that would still send what a reader cut off by the deadline left.
            writer.transport.abort()

    def _evict_waiting(self) -> bool:
        """Make room for a new connection by closing the one that waited longest for a
        request, one never served first; False when every connection is in an exchange."""
        if not self._waiting:
            return False
        oldest = min(self._waiting, key=self._waiting.__getitem__)
        self._waiting.pop(oldest)
        self._cancel(oldest)
        return True

    def _cancel(self, handler: asyncio.Task[None]) -> None:
        self._cancelled.add(handler)
        handler.cancel()

    async def _exchange(
        self,
        header: bytes,
        credential: bytes,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        magic, version, count, body_bytes, _ = _HEADER.unpack(header)
        if magic != MAGIC or version != VERSION:
            raise _Refused(Status.INVALID_ARGUMENT, "not a block request of version 1")
        text = credential.decode("ascii", "replace")
        if self._authenticator.refusal(
            method_name(count, body_bytes), self._address, [text] if text else []
        ):
            raise _Refused(Status.UNAUTHENTICATED, "peer call not authenticated")
        hashes = await self._read_hashes(reader, count, body_bytes)
        values: Sequence[bytes] = []
        if hashes:
            try:
                values = await self._get_prefix(hashes)
            except Exception:
                _log.warning("peer backend get_prefix failed", exc_info=True)
                raise _Refused(Status.INTERNAL, "backend get_prefix failed") from None
            if (
                not isinstance(values, Sequence)
                or len(values) > count
                or not all(isinstance(value, bytes) for value in values)
            ):
                _log.warning(
                    "peer backend get_prefix answered %d hashes with %.200r", count, values
                )
                raise _Refused(Status.INTERNAL, "backend get_prefix answered badly")
        await self._write_values(writer, values)

    async def _read_hashes(
        self, reader: asyncio.StreamReader, count: int, body_bytes: int
    ) -> list[bytes]:
        """The request's hashes, checked against the limits before the body is read."""
        limits = self._limits
        if count > limits.max_keys:
            raise _Refused(
                Status.INVALID_ARGUMENT, f"{count} hashes in one request; at most {limits.max_keys}"
            )
        if body_bytes > count * (_HASH_LENGTH.size + limits.max_key_bytes):
            raise _Refused(Status.INVALID_ARGUMENT, "a request body over the limits")
        body = await reader.readexactly(body_bytes)
        hashes: list[bytes] = []
        offset = 0
        for _ in range(count):
            if offset + _HASH_LENGTH.size > len(body):
                raise _Refused(Status.INVALID_ARGUMENT, "a request body shorter than its count")
            (length,) = _HASH_LENGTH.unpack_from(body, offset)
            offset += _HASH_LENGTH.size
            if length > limits.max_key_bytes or offset + length > len(body):
                raise _Refused(
                    Status.INVALID_ARGUMENT, f"a hash longer than {limits.max_key_bytes} bytes"
                )
            hashes.append(body[offset : offset + length])
            offset += length
        if offset != len(body):
            raise _Refused(Status.INVALID_ARGUMENT, "a request body longer than its hashes")
        if len(set(hashes)) != len(hashes):
            raise _Refused(Status.INVALID_ARGUMENT, "a hash repeated")
        return hashes

    async def _write_values(self, writer: asyncio.StreamWriter, values: Sequence[bytes]) -> None:
        """Send the answer: the values that fit the limits, in order (stopping at the first
        that does not), then the end. Waits for the reader after each large value, so a slow
        reader holds at most about one value and the write buffer in this server's memory
        (until the deadline)."""
        limits = self._limits
        budget = limits.max_batch_bytes
        pending = bytearray([Status.OK])
        for value in values:
            if len(value) > limits.max_value_bytes or len(value) > budget:
                break
            budget -= len(value)
            pending += _VALUE_LENGTH.pack(len(value))
            if len(value) < _COALESCE_BELOW:
                pending += value
            else:
                writer.write(pending)
                writer.write(value)
                pending = bytearray()
                await writer.drain()
        pending += _VALUE_LENGTH.pack(END)
        writer.write(pending)
        await writer.drain()


@dataclass
class PrefixExchange(Generic[_T]):
    """How one client exchange went: what the decoder made of the values that arrived, in
    order, and why the exchange ended early, if it did."""

    values: list[_T] = field(default_factory=list)
    failure: str | None = None
    """None; "timeout" when the deadline passed; "error" for anything else a peer did (a value
    the decoder refused included)."""
    bytes_received: int = 0


class BlockStreamClient:
    """Fetches prefix blocks from peers' `BlockStreamServer`s; keeps a few connections per peer
    open.

    `auth_key` is the cluster secret's peer key; every request carries a fresh credential for the
    address dialled, which must be the one the server advertised. Use it from one event loop.
    """

    def __init__(
        self,
        auth_key: bytes,
        limits: PeerLimits,
        *,
        clock: Callable[[], float] = time.time,
        nonce: Callable[[int], bytes] = secrets.token_bytes,
    ) -> None:
        self._auth_key = check_auth_key(auth_key)
        self._limits = limits
        self._clock = clock
        self._nonce = nonce
        # Per peer: open connections, each with the time it was last used.
        self._idle: dict[str, list[tuple[asyncio.StreamReader, asyncio.StreamWriter, float]]] = {}
        self._closed = False

    async def get_prefix(
        self,
        address: str,
        hashes: Sequence[bytes],
        timeout_s: float,
        decode: Callable[[bytes], _T | None],
    ) -> PrefixExchange[_T]:
        """What the peer `address` holds of the chain `hashes` (distinct), within `timeout_s`.

        `decode` is called on each value as it arrives (on the event loop, while the next one
        is arriving); the first value it refuses (None) ends the exchange, and nothing after it
        is read. What it made of the values before a failure is kept.
        """
        exchange: PrefixExchange[_T] = PrefixExchange()
        limits = self._limits
        if len(hashes) > limits.max_keys or any(len(h) > limits.max_key_bytes for h in hashes):
            exchange.failure = "error"  # the server would refuse it
            return exchange
        try:
            async with asyncio.timeout(timeout_s):
                for reused in self._idle_connections(address):
                    if await self._exchange(address, hashes, decode, exchange, reused):
                        return exchange
                await self._exchange(address, hashes, decode, exchange, None)
        except TimeoutError:
            exchange.failure = "timeout"
        except Exception as exc:  # whatever a peer (or its address) does ends the exchange
            _log.debug("peer %s: block request failed: %s", address, exc)
            exchange.failure = "error"
        return exchange

    async def _exchange(
        self,
        address: str,
        hashes: Sequence[bytes],
        decode: Callable[[bytes], _T | None],
        exchange: PrefixExchange[_T],
        reused: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None,
    ) -> bool:
        """One request on `reused` (or a new connection), its values decoded into `exchange`;
        False when a reused connection turned out closed before any answer (the server had
        dropped it), so that a new one should try."""
        if reused is None:
            host, _, port = address.rpartition(":")
            reader, writer = await asyncio.open_connection(
                host.strip("[]"), int(port), limit=_READ_BUFFER_BYTES
            )
        else:
            reader, writer = reused
        try:
            request = encode_request(
                self._auth_key, address, hashes, self._clock(), self._nonce(NONCE_BYTES)
            )
            writer.write(request)
            status = await reader.read(1)
            if not status and reused is not None:
                writer.close()
                return False
            if status != bytes([Status.OK]):
                raise ConnectionError(f"refused with status {status!r}")
            complete = await self._read_values(reader, len(hashes), decode, exchange)
        except BaseException:
            # Cancelled, timed out or failed mid-exchange: the stream is out of step.
            writer.close()
            raise
        if complete:
            self._keep(address, reader, writer)
        else:
            exchange.failure = "error"
            writer.close()  # the rest of the answer is unread
        return True

    async def forget(self, address: str) -> None:
        """Close the idle connections to `address` (a peer that left)."""
        for _, writer, _ in self._idle.pop(address, []):
            writer.close()

    async def close(self) -> None:
        """Close every idle connection; those in use close when their exchange ends."""
        self._closed = True
        for address in list(self._idle):
            await self.forget(address)

    async def _read_values(
        self,
        reader: asyncio.StreamReader,
        count: int,
        decode: Callable[[bytes], _T | None],
        exchange: PrefixExchange[_T],
    ) -> bool:
        """Read and decode values up to the end (True), or up to one `decode` refused (False);
        raises for an answer that breaks the format or the limits."""
        limits = self._limits
        budget = limits.max_batch_bytes
        for _ in range(count + 1):
            (size,) = _VALUE_LENGTH.unpack(await reader.readexactly(_VALUE_LENGTH.size))
            if size == END:
                return True
            if len(exchange.values) == count:
                raise ValueError(f"more values than the {count} hashes asked for")
            if size > limits.max_value_bytes or size > budget:
                raise ValueError(f"a value of {size} bytes announced, over the limits")
            budget -= size
            value = await reader.readexactly(size)
            exchange.bytes_received += size
            decoded = decode(value)
            if decoded is None:
                return False
            exchange.values.append(decoded)
        raise AssertionError("unreachable: the loop returns or raises")  # pragma: no cover

    def _idle_connections(
        self, address: str
    ) -> Iterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
        """Open connections to `address` worth trying, most recently used first; closes those
        the server may be about to drop (idle for half its timeout)."""
        idle = self._idle.get(address, [])
        while idle:
            reader, writer, used = idle.pop()
            if time.monotonic() - used < IDLE_TIMEOUT_S / 2 and not reader.at_eof():
                yield reader, writer
            else:
                writer.close()

    def _keep(
        self, address: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        idle = self._idle.setdefault(address, [])
        if self._closed or len(idle) >= _MAX_IDLE_CONNECTIONS:
            writer.close()
        else:
            idle.append((reader, writer, time.monotonic()))


def join_host_port(host: str, port: int) -> str:
    """`host:port`, with an IPv6 host in brackets."""
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"
