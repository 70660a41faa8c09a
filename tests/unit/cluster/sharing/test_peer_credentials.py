"""Peer call credentials and the server's memory of used ones (pure: no network)."""

from __future__ import annotations

import pytest

from cluster.sharing.peer import method_path
from cluster.sharing.peer_auth import ReplayGuard, parse_credential, peer_credential

KEY = bytes(range(32))
NONCE = bytes(16)


def test_a_credential_parses_back_to_its_parts() -> None:
    text = peer_credential(KEY, method_path("Ping"), "10.0.0.1:5000", 1_700_000_000.123, NONCE)
    unix_ms, nonce, mac = text.split(".")
    assert unix_ms == "1700000000123" and nonce == NONCE.hex() and len(mac) == 64
    parsed = parse_credential(text)
    assert parsed is not None
    assert (parsed.unix_ms, parsed.nonce, parsed.mac.hex()) == (1_700_000_000_123, NONCE, mac)


def test_the_mac_depends_on_every_part() -> None:
    base = ("/raycache.peer.v1.Peer/Ping", "10.0.0.1:5000", 1_700_000_000.0, NONCE)
    macs = {
        peer_credential(KEY, *base).split(".")[2],
        peer_credential(bytes(32), *base).split(".")[2],
        peer_credential(KEY, "/raycache.peer.v1.Peer/GetResults", *base[1:]).split(".")[2],
        peer_credential(KEY, base[0], "10.0.0.2:5000", *base[2:]).split(".")[2],
        peer_credential(KEY, *base[:2], 1_700_000_000.001, NONCE).split(".")[2],
        peer_credential(KEY, *base[:3], b"\x01" * 16).split(".")[2],
    }
    assert len(macs) == 6


@pytest.mark.parametrize(
    "text",
    [
        "",
        "1.2",
        "1.2.3.4",
        f"-5.{NONCE.hex()}.{'0' * 64}",
        f"{'9' * 16}.{NONCE.hex()}.{'0' * 64}",  # more digits than any unix ms
        f"\uff11\uff12.{NONCE.hex()}.{'0' * 64}",  # digits, but not ASCII ones
        f"12.{NONCE.hex()[:-2]}.{'0' * 64}",
        f"12.{NONCE.hex()}.{'0' * 62}",
        f"12.{NONCE.hex()}.{'z' * 64}",
    ],
)
def test_malformed_credentials_do_not_parse(text: str) -> None:
    assert parse_credential(text) is None


def test_a_nonce_is_admitted_once_within_the_window() -> None:
    guard = ReplayGuard(capacity=100, window_s=30)
    assert guard.admit(b"a", unix_ms=1_000, now_ms=1_000)
    assert not guard.admit(b"a", unix_ms=1_000, now_ms=2_000)
    assert guard.admit(b"b", unix_ms=1_500, now_ms=2_000)


def test_a_full_memory_forgets_the_oldest_and_refuses_anything_as_old() -> None:
    guard = ReplayGuard(capacity=3, window_s=30)
    for i, nonce in enumerate((b"a", b"b", b"c")):
        assert guard.admit(nonce, unix_ms=1_000 + i, now_ms=1_010)
    assert guard.admit(b"d", unix_ms=1_005, now_ms=1_010)  # forgets "a" (1_000)
    assert not guard.admit(b"a", unix_ms=1_000, now_ms=1_010)  # its replay: at the floor
    assert not guard.admit(b"e", unix_ms=999, now_ms=1_010)  # older than what was forgotten
    assert guard.admit(b"f", unix_ms=1_006, now_ms=1_010)
    assert not guard.admit(b"c", unix_ms=1_002, now_ms=1_010)  # still remembered


def test_expired_nonces_are_dropped_so_memory_stays_for_new_ones() -> None:
    guard = ReplayGuard(capacity=2, window_s=1)
    assert guard.admit(b"a", unix_ms=0, now_ms=0)
    assert guard.admit(b"b", unix_ms=10, now_ms=10)
    # Both are out of the window now: dropped, the floor only as high as their times.
    assert guard.admit(b"c", unix_ms=5_000, now_ms=5_000)
    assert guard.admit(b"d", unix_ms=4_500, now_ms=5_000)


def test_a_clock_set_back_does_not_revive_an_expired_nonce() -> None:
    guard = ReplayGuard(capacity=10, window_s=1)
    assert guard.admit(b"a", unix_ms=0, now_ms=0)
    assert guard.admit(b"b", unix_ms=5_000, now_ms=5_000)  # "a" is dropped as expired
    assert not guard.admit(b"a", unix_ms=0, now_ms=500)  # the clock went back to 0.5 s


def test_a_clock_that_jumped_ahead_and_back_refuses_nothing_once_it_is_right() -> None:
    guard = ReplayGuard(capacity=10, window_s=1)
    assert guard.admit(b"a", unix_ms=0, now_ms=0)
    hour_ms = 3_600_000
    assert guard.admit(b"b", unix_ms=hour_ms, now_ms=hour_ms)  # a caller as wrong as this clock
    # The clock is right again: callers with right clocks are admitted at once...
    assert guard.admit(b"c", unix_ms=600, now_ms=600)
    # ...and nothing seen before comes back.
    assert not guard.admit(b"a", unix_ms=0, now_ms=600)
    assert not guard.admit(b"b", unix_ms=hour_ms, now_ms=hour_ms)
