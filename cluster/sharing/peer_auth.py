"""Authentication of calls between replicas: one-time credentials made from the cluster secret.

Every peer call, over the gRPC peer service (`cluster.sharing.peer`) or the block stream
(`cluster.sharing.peer_blocks`), carries a credential made from the peer key of the cluster secret
(`ClusterSecret.peer`), which every replica holds:

    <unix ms>.<nonce, 32 hex>.<mac, 64 hex>
    mac = BLAKE2b-256(key = peer key; method, server address, unix ms, nonce)

`method` names the call (a gRPC method path, or the block stream's request with its sizes). A
server accepts a call only when the MAC is right (compared in constant time), the time is within
`AUTH_WINDOW_S` of its own clock, and the nonce is new. It remembers the nonces it accepted for
as long as their time stays in the window, at most a configured number of them; when that memory
is full it forgets the oldest and from then on refuses any credential that is not newer than the
one it forgot, so a replay is refused either way. The server address (as advertised) is in the
MAC, so a credential seen going to one replica is no good at another. One `CallAuthenticator`
serves both transports of a replica, so a nonce is used once across them.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

__all__ = [
    "AUTH_WINDOW_S",
    "NONCE_BYTES",
    "CallAuthenticator",
    "ReplayGuard",
    "check_auth_key",
    "parse_credential",
    "peer_credential",
]

_log = logging.getLogger(__name__)

AUTH_WINDOW_S: Final = 30.0
"""How far a credential's time may be from the server's clock, either way."""
NONCE_BYTES: Final = 16
_MAC_BYTES: Final = 32
_MAC_PERSON: Final = b"raycache peer v1"  # BLAKE2b personalisation: this use of the key only
_MIN_KEY_BYTES: Final = 16
_MAX_KEY_BYTES: Final = 64  # BLAKE2b's longest key
_MAX_TIME_DIGITS: Final = 15  # unix ms until the year 33658; bounds int() of a hostile string


def check_auth_key(key: bytes) -> bytes:
    """`key`, when it can be a peer key; ValueError otherwise."""
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
    """The credential of one call of `method` to the server advertised as `address`.

    `now_s` is the caller's unix time; `nonce` is 16 random bytes, never used twice.
    """
    unix_ms = int(now_s * 1000)
    mac = _mac(key, method, address, unix_ms, nonce)
    return f"{unix_ms}.{nonce.hex()}.{mac.hex()}"


@dataclass(frozen=True)
class Credential:
    """The parts of a credential, parsed but not yet checked."""

    unix_ms: int
    nonce: bytes
    mac: bytes


def parse_credential(text: str) -> Credential | None:
    """The parts of a credential, or None when it is not one."""
    parts = text.split(".")
    if len(parts) != 3:
        return None
    unix_ms, nonce, mac = parts
    if not (unix_ms.isascii() and unix_ms.isdigit() and len(unix_ms) <= _MAX_TIME_DIGITS):
        return None
    try:
        credential = Credential(int(unix_ms), bytes.fromhex(nonce), bytes.fromhex(mac))
    except ValueError:
        return None
    if len(credential.nonce) != NONCE_BYTES or len(credential.mac) != _MAC_BYTES:
        return None
    return credential


class ReplayGuard:
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
            self._forget_oldest()
        if unix_ms < expired or unix_ms <= self._floor or nonce in self._seen:
            return False
        if len(self._order) >= self._capacity:
            self._forget_oldest()
            if unix_ms <= self._floor:
                return False
        self._order.append((unix_ms, nonce))
        self._seen.add(nonce)
        return True

    def _forget_oldest(self) -> None:
        forgotten, oldest = self._order.popleft()
        self._seen.discard(oldest)
        self._floor = max(self._floor, forgotten)


class CallAuthenticator:
    """Checks the credentials of calls to one replica's servers, remembering `memory` nonces,
    against unix time `clock`; counts, and logs, the calls it refuses."""

    def __init__(self, key: bytes, memory: int, clock: Callable[[], float]) -> None:
        self._key = check_auth_key(key)
        self._clock = clock
        self._guard = ReplayGuard(memory, AUTH_WINDOW_S)
        self.rejected = 0

    def refusal(self, method: str, address: str | None, credentials: list[str]) -> str | None:
        """Why a call of `method` to the server advertised as `address` (None: not serving),
        with these credential values, is refused (counted and logged); None when it carries
        exactly one valid, fresh, unused credential."""
        reason = self._check(method, address, credentials)
        if reason is not None:
            self.rejected += 1
            # At the 1st, 2nd, 4th, 8th ... refusal: an attack shows in the log without flooding.
            level = logging.WARNING if self.rejected & (self.rejected - 1) == 0 else logging.DEBUG
            _log.log(
                level, "peer call %.100r refused (%s); %d so far", method, reason, self.rejected
            )
        return reason

    def _check(self, method: str, address: str | None, credentials: list[str]) -> str | None:
        if len(credentials) != 1 or not isinstance(credentials[0], str):
            return "no credential" if not credentials else "a malformed credential"
        credential = parse_credential(credentials[0])
        if credential is None:
            return "a malformed credential"
        now_ms = self._clock() * 1000
        if abs(credential.unix_ms - now_ms) > AUTH_WINDOW_S * 1000:
            return "a credential outside the time window"
        if address is None:
            return "the server is not serving"
        expected = _mac(self._key, method, address, credential.unix_ms, credential.nonce)
        if not hmac.compare_digest(expected, credential.mac):
            return "a wrong MAC"
        if not self._guard.admit(credential.nonce, credential.unix_ms, now_ms):
            return "a credential used before"
        return None
