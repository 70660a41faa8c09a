"""The cached form of an answer: round trip, untrusted bytes rejected as CodecError, and a
valid answer refused under any other key, tenant, model or version than its own."""

import dataclasses

import msgpack
import pytest

from cluster.codec import CodecError, encode
from cluster.secret import ClusterSecret
from cluster.sharing.tiered import ForeignValue, StaleValue
from cluster.versions.invalidation import InvalidationRule, InvalidationRules
from serve_app.models import Generation
from serve_app.replica.answers import (
    ANSWER_KIND,
    AnswerIdentity,
    answer_tags,
    decode_answer,
    encode_answer,
)

GENERATION = Generation(prompt_tokens=5, tokens=(104, 105), text="hi", finish_reason="length")
SECRET = ClusterSecret(b"0123456789abcdef-cluster-secret")
OTHER = ClusterSecret(b"the secret of another cluster")
IDENTITY = AnswerIdentity(key="ab" * 32, tenant="t", model="m", version="7")


def answer(identity: AnswerIdentity = IDENTITY, secret: ClusterSecret = SECRET) -> bytes:
    return encode_answer(GENERATION, identity, secret)


def test_round_trip():
    outcome = decode_answer(answer(), "redis", SECRET, expect=IDENTITY)
    assert (outcome.text, outcome.finish_reason) == ("hi", "length")
    assert (outcome.prompt_tokens, outcome.completion_tokens) == (5, 2)
    assert (outcome.model_version, outcome.cache_tier) == ("7", "redis")


def test_the_answer_records_when_it_was_computed():
    """What invalidation rules are checked against, wherever the answer is kept."""
    blob = encode_answer(GENERATION, IDENTITY, SECRET, created_at=1234.5)
    assert decode_answer(blob, "peer", SECRET, expect=IDENTITY).created_at == 1234.5


@pytest.mark.parametrize(
    "moved",
    [
        {"key": "cd" * 32},  # another prompt (or sampling parameters)
        {"tenant": "mallory"},
        {"model": "other-model"},
        {"version": "8"},
    ],
    ids=lambda moved: next(iter(moved)),
)
def test_a_valid_answer_copied_to_another_request_is_refused(moved):
    """The bytes are untouched and correctly signed: only what they answer differs."""
    with pytest.raises(CodecError) as info:
        decode_answer(answer(), "redis", SECRET, expect=dataclasses.replace(IDENTITY, **moved))
    assert info.value.reason == "identity"


def test_an_answer_signed_under_another_secret_is_foreign_not_corrupt():
    with pytest.raises(ForeignValue):
        decode_answer(answer(secret=OTHER), "redis", SECRET, expect=IDENTITY)
    assert decode_answer(answer(secret=OTHER), "redis", OTHER, expect=IDENTITY).text == "hi"


@pytest.mark.parametrize("position", [30, 100, -3, -1])
def test_a_flipped_byte_is_refused_as_corrupt(position):
    blob = bytearray(answer())
    blob[position] ^= 0x10
    with pytest.raises(CodecError) as info:
        decode_answer(bytes(blob), "peer", SECRET, expect=IDENTITY)
    assert not isinstance(info.value, ForeignValue)


@pytest.mark.parametrize(
    "inner",
    [
        b"\xc1",  # never valid msgpack
        msgpack.packb([1, 2]),
        msgpack.packb({"text": "x"}),
        msgpack.packb(
            {"text": 1, "finish_reason": "stop", "prompt_tokens": 1, "completion_tokens": 1}
        ),
        msgpack.packb(
            {"text": "x", "finish_reason": "exploded", "prompt_tokens": 1, "completion_tokens": 1}
        ),
    ],
)
def test_a_valid_envelope_with_a_bad_answer_inside_is_rejected(inner):
    meta = {"key": IDENTITY.key, "tenant": IDENTITY.tenant}
    blob = encode(ANSWER_KIND, "m", "7", created_at=0.0, blob=inner, meta=meta, secret=SECRET)
    with pytest.raises(CodecError):
        decode_answer(blob, "redis", SECRET, expect=IDENTITY)


@pytest.mark.parametrize(
    "meta", [{}, {"key": IDENTITY.key}, {"key": 1, "tenant": "t"}, {**IDENTITY.__dict__}]
)
def test_an_answer_must_record_exactly_its_key_and_tenant(meta):
    inner = msgpack.packb(
        {"text": "x", "finish_reason": "stop", "prompt_tokens": 1, "completion_tokens": 1}
    )
    blob = encode(ANSWER_KIND, "m", "7", created_at=0.0, blob=inner, meta=meta, secret=SECRET)
    with pytest.raises(CodecError):
        decode_answer(blob, "redis", SECRET, expect=IDENTITY)


def test_another_kind_of_envelope_is_rejected():
    with pytest.raises(CodecError):
        kv = encode("kv", "m", "7", created_at=0.0, secret=SECRET)
        decode_answer(kv, "redis", SECRET, expect=IDENTITY)


def test_an_invalidated_answer_is_stale():
    rules = InvalidationRules([InvalidationRule(seq=1, issued_at=4e9, tenant="t")])
    with pytest.raises(StaleValue):
        decode_answer(answer(), "redis", SECRET, rules, expect=IDENTITY)


def test_tags_come_from_a_verified_envelope_stored_under_its_own_key():
    tags = answer_tags(answer(), SECRET, IDENTITY.key)
    assert (tags.model, tags.version, tags.tenant) == ("m", "7", "t")
    with pytest.raises(CodecError) as info:
        answer_tags(answer(), SECRET, "cd" * 32)  # a peer PUT under another key
    assert info.value.reason == "identity"
    with pytest.raises(CodecError) as info:
        answer_tags(answer(secret=OTHER), SECRET, IDENTITY.key)
    assert info.value.reason == "foreign_secret"
    forged = encode(ANSWER_KIND, "m", "1", created_at=0.0, blob=b"x", secret=SECRET)
    with pytest.raises(CodecError):
        answer_tags(forged, SECRET, IDENTITY.key)
