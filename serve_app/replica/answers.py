"""What an answer is cached under (`completion_key`, `embedding_key`), and its cached form: a
codec envelope around a small msgpack map (a completion's text, or one input's embedding).

The same bytes live in the local result cache and travel to peers and Redis, so decoding treats
them as untrusted: the envelope's MAC is verified, the map is read with msgpack's limits, and
every field is type-checked. An envelope records what it answers (result key, tenant, model,
version) and decoding checks these against the request, so a valid value copied under another
key (another prompt, tenant or version) is refused like a corrupt one. Anything wrong is a
`CodecError`, which callers count as a miss; a value signed under another cluster secret is a
`ForeignValue`, a miss that is not deleted.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import msgpack

from cluster.codec import CodecError, Envelope, decode, encode
from cluster.keys import RequestIdentity, ResultKey, result_key, token_ids_bytes
from cluster.local.result_cache import EntryTags
from cluster.secret import ClusterSecret
from cluster.sharing.tiered import ForeignValue, StaleValue
from cluster.versions.invalidation import InvalidationRules
from cluster.versions.records import ModelVersion
from serve_app.api.completions import CacheTier, CompletionJob, CompletionOutcome
from serve_app.api.embeddings import EmbeddingOutcome
from serve_app.models import Generation, SamplingParams

ANSWER_KIND = "completion"
COMPLETION_KIND = "completion"
EMBEDDING_KIND = "embedding"
_KINDS = frozenset({ANSWER_KIND, EMBEDDING_KIND})
MAX_EMBEDDING_DIMENSIONS = 65536
MAX_ANSWER_BYTES = 4 * 1024 * 1024
_FIELDS: dict[str, type] = {
    "text": str,
    "finish_reason": str,
    "prompt_tokens": int,
    "completion_tokens": int,
}
# Written since streaming: an answer stored before it has none (read as no pieces).
_OPTIONAL_FIELDS: dict[str, type] = {"pieces": list}
_ALL_FIELDS = frozenset(_FIELDS) | frozenset(_OPTIONAL_FIELDS)
_META_KEYS = frozenset({"key", "tenant"})


def cache_params(params: SamplingParams) -> dict[str, object]:
    """The parameters that decide a completion, as they enter its key.

    Greedy decoding ignores `top_p` and `seed`, so they are left out of greedy keys: greedy
    requests that differ only in them share one answer.
    """
    key: dict[str, object] = {
        "max_tokens": params.max_tokens,
        "temperature": float(params.temperature),
        "stop": list(params.stop),
    }
    if params.temperature > 0:
        key["top_p"] = float(params.top_p)
        key["seed"] = params.seed
    return key


def completion_key(
    namespace: str,
    secret: ClusterSecret,
    job: CompletionJob,
    weights: ModelVersion,
    tenant_salt: str | None = None,
) -> ResultKey:
    """The result key of `job` answered by `weights` (a version and its generation): keyed
    with the cluster secret, and with the tenant's salt (derived from the secret when not
    given) standing for the tenant."""
    identity = RequestIdentity(
        namespace=namespace,
        tenant=secret.tenant_salt(job.tenant) if tenant_salt is None else tenant_salt,
        model_id=job.model,
        model_version=weights.version,
        model_generation=weights.generation,
        kind=COMPLETION_KIND,
    )
    tokens = token_ids_bytes(job.prompt_tokens)
    return result_key(identity, tokens, cache_params(job.params), secret.keys)


def embedding_key(
    namespace: str,
    secret: ClusterSecret,
    tenant_salt: str,
    model: str,
    weights: ModelVersion,
    tokens: tuple[int, ...],
) -> ResultKey:
    """The result key of one input's embedding by `weights`, keyed like a completion's."""
    identity = RequestIdentity(
        namespace=namespace,
        tenant=tenant_salt,
        model_id=model,
        model_version=weights.version,
        model_generation=weights.generation,
        kind=EMBEDDING_KIND,
    )
    return result_key(identity, token_ids_bytes(tokens), {}, secret.keys)


@dataclass(frozen=True)
class AnswerIdentity:
    """What an answer answers: its result key (hex), and the tenant, model and version whose
    request it is the answer to."""

    key: str
    tenant: str
    model: str
    version: str

    @classmethod
    def of(cls, key: str, tags: EntryTags) -> AnswerIdentity:
        """The identity of the entry stored under `key` with `tags`."""
        return cls(key=key, tenant=tags.tenant, model=tags.model, version=tags.version)

    def tags(self) -> EntryTags:
        """The invalidation tags of an entry with this identity."""
        return EntryTags(model=self.model, version=self.version, tenant=self.tenant)


def cached_pieces(generation: Generation) -> tuple[int, ...]:
    """The piece lengths an answer keeps in the cache: its generation's, unless they do not
    spell its text (a tokenizer that rewrote what it had decoded); then none, and the answer
    streams from the cache in one piece."""
    return generation.pieces if sum(generation.pieces) == len(generation.text) else ()


def encode_answer(
    generation: Generation,
    identity: AnswerIdentity,
    secret: ClusterSecret,
    created_at: float | None = None,
) -> bytes:
    """The envelope of `generation`, signed under `secret`, recording `identity` (so that it
    is refused under any other key, and invalidation by key reaches every copy) and when it
    was computed (`created_at`, now when not given)."""
    answer = {
        "text": generation.text,
        "finish_reason": generation.finish_reason,
        "prompt_tokens": generation.prompt_tokens,
        "completion_tokens": len(generation.tokens),
        "pieces": list(cached_pieces(generation)),
    }
    return encode(
        ANSWER_KIND,
        identity.model,
        identity.version,
        created_at=time.time() if created_at is None else created_at,
        blob=msgpack.packb(answer),
        meta={"tenant": identity.tenant, "key": identity.key},
        secret=secret,
    )


def encode_embedding(
    vector: bytes, tokens: int, identity: AnswerIdentity, secret: ClusterSecret
) -> bytes:
    """The envelope of one input's embedding (`vector`: little-endian float32), signed."""
    return encode(
        EMBEDDING_KIND,
        identity.model,
        identity.version,
        created_at=time.time(),
        blob=msgpack.packb({"vector": vector, "tokens": tokens}),
        meta={"tenant": identity.tenant, "key": identity.key},
        secret=secret,
    )


def answer_tags(
    blob: bytes, secret: ClusterSecret, key: str, rules: InvalidationRules | None = None
) -> EntryTags:
    """The tags of a verified answer envelope stored under `key` (for storing one a peer sent).

    Raises CodecError when the envelope is invalid, is not a well-formed answer, was signed
    under another secret (reason "foreign_secret") or records another key than `key`, and
    `StaleValue` when an invalidation rule in `rules` covers it.
    """
    envelope, identity = _open(blob, secret)
    if identity.key != key:
        raise CodecError("identity", "answer was recorded under another key")
    _value(envelope, "peer")  # the whole answer must be valid too
    _check_rules(envelope, identity, rules)
    return identity.tags()


def decode_answer(
    blob: bytes,
    tier: CacheTier,
    secret: ClusterSecret,
    rules: InvalidationRules | None = None,
    *,
    expect: AnswerIdentity,
) -> CompletionOutcome | EmbeddingOutcome:
    """The outcome stored by `encode_answer` (or `encode_embedding`) for the request `expect`,
    as served from `tier`; the key in `expect` says which of the two it is.

    Raises `CodecError` for a malformed value or one recorded for another identity than
    `expect` (reason "identity"), `ForeignValue` for one signed under another cluster secret,
    and `StaleValue` for one that an invalidation rule in `rules` covers.
    """
    try:
        envelope, identity = _open(blob, secret)
    except CodecError as exc:
        if exc.reason == "foreign_secret":
            raise ForeignValue(str(exc)) from None
        raise
    if identity != expect:
        raise CodecError("identity", "answer was recorded for another key, tenant or version")
    _check_rules(envelope, identity, rules)
    return _value(envelope, tier)


def _check_rules(
    envelope: Envelope, identity: AnswerIdentity, rules: InvalidationRules | None
) -> None:
    """Raise `StaleValue` when an invalidation rule in `rules` covers this answer."""
    if rules is not None and rules.covers(identity.tags(), identity.key, envelope.created_at):
        raise StaleValue(f"answer of {envelope.model} {envelope.version} was invalidated")


def _open(blob: bytes, secret: ClusterSecret) -> tuple[Envelope, AnswerIdentity]:
    """The verified envelope of an answer and the identity it records; raises CodecError."""
    envelope = decode(blob, secret=secret, max_bytes=MAX_ANSWER_BYTES)
    if envelope.kind not in _KINDS:
        raise CodecError("header", f"not an answer: kind {envelope.kind!r}")
    meta = envelope.meta
    if meta.keys() != _META_KEYS or not all(isinstance(meta[name], str) for name in _META_KEYS):
        raise CodecError("header", "answer metadata must be exactly a str key and tenant")
    identity = AnswerIdentity(
        key=meta["key"], tenant=meta["tenant"], model=envelope.model, version=envelope.version
    )
    return envelope, identity


def _value(envelope: Envelope, tier: CacheTier) -> CompletionOutcome | EmbeddingOutcome:
    """The answer inside a verified envelope, type-checked field by field."""
    try:
        fields: Any = msgpack.unpackb(
            envelope.blob,
            raw=False,
            strict_map_key=True,
            max_str_len=MAX_ANSWER_BYTES,
            max_bin_len=MAX_ANSWER_BYTES,
        )
    except (ValueError, msgpack.UnpackException) as exc:
        raise CodecError("header", f"answer is not valid msgpack: {exc}") from None
    if envelope.kind == EMBEDDING_KIND:
        return _embedding(fields, envelope, tier)
    if not isinstance(fields, dict) or not set(_FIELDS) <= set(fields) <= _ALL_FIELDS:
        raise CodecError("header", "answer fields are not the expected ones")
    pieces = fields.get("pieces", [])
    if type(pieces) is not list:
        raise CodecError("header", "answer pieces are not a list")
    for name, kind in _FIELDS.items():
        if type(fields[name]) is not kind:
            raise CodecError("header", f"answer field {name} is not {kind.__name__}")
    if fields["finish_reason"] not in ("stop", "length"):
        raise CodecError("header", "answer finish_reason is invalid")
    if any(type(n) is not int or n < 0 for n in pieces) or sum(pieces) > len(fields["text"]):
        raise CodecError("header", "answer pieces are not lengths within its text")
    return CompletionOutcome(
        text=fields["text"],
        finish_reason=fields["finish_reason"],
        prompt_tokens=fields["prompt_tokens"],
        completion_tokens=fields["completion_tokens"],
        cached_tokens=0,
        model_version=envelope.version,
        cache_tier=tier,
        pieces=tuple(pieces),
        created_at=envelope.created_at,
    )


def _embedding(fields: Any, envelope: Envelope, tier: CacheTier) -> EmbeddingOutcome:
    if not isinstance(fields, dict) or set(fields) != {"vector", "tokens"}:
        raise CodecError("header", "embedding fields are not the expected ones")
    vector, tokens = fields["vector"], fields["tokens"]
    if type(vector) is not bytes or len(vector) % 4 or len(vector) > 4 * MAX_EMBEDDING_DIMENSIONS:
        raise CodecError("header", "embedding vector is not float32 values")
    if type(tokens) is not int or tokens < 1:
        raise CodecError("header", "embedding token count is invalid")
    return EmbeddingOutcome(
        vector=vector, tokens=tokens, model_version=envelope.version, cache_tier=tier
    )
