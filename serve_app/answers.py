"""The cached form of a completion answer: a codec envelope around a small msgpack map.

The same bytes live in the local result cache and travel to peers and Redis, so decoding treats
them as untrusted: the envelope's checksum (and HMAC, with a cluster secret) is verified, the
map is read with msgpack's limits, and every field is type-checked. Anything wrong is a
`CodecError`, which callers count as a miss.
"""

from __future__ import annotations

import time
from typing import Any

import msgpack

from cluster.codec import CodecError, decode, encode
from cluster.invalidation import InvalidationRules
from cluster.result_cache import EntryTags
from cluster.tiered import StaleValue
from serve_app.completions import CacheTier, CompletionOutcome
from serve_app.models import Generation

ANSWER_KIND = "completion"
MAX_ANSWER_BYTES = 4 * 1024 * 1024
_FIELDS: dict[str, type] = {
    "text": str,
    "finish_reason": str,
    "prompt_tokens": int,
    "completion_tokens": int,
}


def encode_answer(
    generation: Generation,
    model: str,
    version: str,
    tenant: str,
    secret: bytes | None = None,
    key: str | None = None,
) -> bytes:
    """The envelope of `generation`, produced by `model` at `version` for `tenant`, cached
    under the result key `key` (hex; recorded so invalidation by key reaches every copy)."""
    answer = {
        "text": generation.text,
        "finish_reason": generation.finish_reason,
        "prompt_tokens": generation.prompt_tokens,
        "completion_tokens": len(generation.tokens),
    }
    return encode(
        ANSWER_KIND,
        model,
        version,
        created_at=time.time(),
        blob=msgpack.packb(answer),
        meta={"tenant": tenant} if key is None else {"tenant": tenant, "key": key},
        secret=secret,
    )


def answer_tags(blob: bytes, secret: bytes | None = None) -> EntryTags:
    """The tags of a verified answer envelope (for storing one a peer sent); raises CodecError."""
    envelope = decode(blob, secret=secret, max_bytes=MAX_ANSWER_BYTES, expect_kind=ANSWER_KIND)
    tenant = envelope.meta.get("tenant")
    if not isinstance(tenant, str):
        raise CodecError("header", "answer has no tenant")
    decode_answer(blob, "peer", secret)  # the whole answer must be valid too
    return EntryTags(model=envelope.model, version=envelope.version, tenant=tenant)


def decode_answer(
    blob: bytes,
    tier: CacheTier,
    secret: bytes | None = None,
    rules: InvalidationRules | None = None,
) -> CompletionOutcome:
    """The outcome stored by `encode_answer`, as served from `tier`.

    Raises `CodecError` for a malformed value, and `StaleValue` for one that an invalidation
    rule in `rules` covers.
    """
    envelope = decode(blob, secret=secret, max_bytes=MAX_ANSWER_BYTES, expect_kind=ANSWER_KIND)
    if rules is not None and len(rules):
        tenant, key = envelope.meta.get("tenant"), envelope.meta.get("key")
        tags = EntryTags(model=envelope.model, version=envelope.version, tenant=str(tenant))
        if rules.covers(tags, key if isinstance(key, str) else None, envelope.created_at):
            raise StaleValue(f"answer of {envelope.model} {envelope.version} was invalidated")
    try:
        fields: Any = msgpack.unpackb(
            envelope.blob, raw=False, strict_map_key=True, max_str_len=MAX_ANSWER_BYTES
        )
    except (ValueError, msgpack.UnpackException) as exc:
        raise CodecError("header", f"answer is not valid msgpack: {exc}") from None
    if not isinstance(fields, dict) or set(fields) != set(_FIELDS):
        raise CodecError("header", "answer fields are not the expected ones")
    for name, kind in _FIELDS.items():
        if type(fields[name]) is not kind:
            raise CodecError("header", f"answer field {name} is not {kind.__name__}")
    if fields["finish_reason"] not in ("stop", "length"):
        raise CodecError("header", "answer finish_reason is invalid")
    return CompletionOutcome(
        text=fields["text"],
        finish_reason=fields["finish_reason"],
        prompt_tokens=fields["prompt_tokens"],
        completion_tokens=fields["completion_tokens"],
        cached_tokens=0,
        model_version=envelope.version,
        cache_tier=tier,
    )
