"""ByteTokenizer: exact round trips, special ids skipped, broken UTF-8 replaced."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from serve_app.models import EOS_TOKEN_ID, ByteTokenizer

TOKENIZER = ByteTokenizer()


def test_vocabulary_is_bytes_plus_eos() -> None:
    assert EOS_TOKEN_ID == ByteTokenizer.eos_token_id == 256
    assert ByteTokenizer.vocab_size == 257


@pytest.mark.parametrize("text", ["", "hello", "héllo wörld", "日本語", "emoji 🚀\n\ttab", "\x00"])
def test_round_trip(text: str) -> None:
    ids = TOKENIZER.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert all(0 <= i < 256 for i in ids)
    assert TOKENIZER.decode(ids) == text


@given(st.text())
def test_round_trip_any_text(text: str) -> None:
    assert TOKENIZER.decode(TOKENIZER.encode(text)) == text


def test_decode_skips_special_ids() -> None:
    ids = [EOS_TOKEN_ID, *TOKENIZER.encode("a€"), EOS_TOKEN_ID, 300]
    assert TOKENIZER.decode(ids) == "a€"


def test_decode_replaces_invalid_utf8() -> None:
    cut_short = TOKENIZER.encode("€")[:2]
    assert TOKENIZER.decode([*cut_short, ord("x")]) == "\ufffdx"
    assert TOKENIZER.decode([0xFF]) == "\ufffd"


def test_negative_id_is_an_error() -> None:
    with pytest.raises(ValueError):
        TOKENIZER.decode([-1])


def test_lone_surrogate_is_an_error() -> None:
    with pytest.raises(ValueError):
        TOKENIZER.encode("\ud800")
