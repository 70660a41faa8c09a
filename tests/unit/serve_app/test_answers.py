"""The cached form of an answer: round trip, and untrusted bytes rejected as CodecError."""

import msgpack
import pytest

from cluster.codec import CodecError, encode
from serve_app.answers import ANSWER_KIND, decode_answer, encode_answer
from serve_app.models import Generation

GENERATION = Generation(prompt_tokens=5, tokens=(104, 105), text="hi", finish_reason="length")
SECRET = b"0123456789abcdef-cluster-secret"


@pytest.mark.parametrize("secret", [None, SECRET])
def test_round_trip(secret):
    outcome = decode_answer(encode_answer(GENERATION, "m", "7", "t", secret), "redis", secret)
    assert (outcome.text, outcome.finish_reason) == ("hi", "length")
    assert (outcome.prompt_tokens, outcome.completion_tokens) == (5, 2)
    assert (outcome.model_version, outcome.cache_tier) == ("7", "redis")


def test_tampering_and_wrong_secrets_are_rejected():
    blob = bytearray(encode_answer(GENERATION, "m", "7", "t", SECRET))
    with pytest.raises(CodecError):
        decode_answer(bytes(blob), "peer", b"another-secret-of-16+")
    with pytest.raises(CodecError):
        decode_answer(bytes(blob), "peer", None)
    blob[-3] ^= 0xFF
    with pytest.raises(CodecError):
        decode_answer(bytes(blob), "peer", SECRET)


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
    blob = encode(ANSWER_KIND, "m", "1", created_at=0.0, blob=inner)
    with pytest.raises(CodecError):
        decode_answer(blob, "redis")


def test_another_kind_of_envelope_is_rejected():
    with pytest.raises(CodecError):
        decode_answer(encode("kv", "m", "1", created_at=0.0), "redis")


def test_tags_come_from_a_verified_envelope():
    from serve_app.answers import answer_tags

    tags = answer_tags(encode_answer(GENERATION, "m", "7", "alice", SECRET), SECRET)
    assert (tags.model, tags.version, tags.tenant) == ("m", "7", "alice")
    with pytest.raises(CodecError):
        answer_tags(encode(ANSWER_KIND, "m", "1", created_at=0.0, blob=b"x"))
