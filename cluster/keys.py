"""Canonical request keys.

A result key is a cryptographic digest of a canonical encoding of everything that determines an
answer: namespace, tenant, model id, model version, request kind, input and parameters. Two
requests get the same key exactly when these are equal, in every process and on every machine,
so keys can be shared through peers and Redis. Python's `hash()` is never used: it is seeded per
process, and a non-cryptographic hash would let a client craft collisions that poison another
tenant's answers.

The encoding is type-tagged and length-prefixed, so `["ab", "c"]` and `["a", "bc"]`, `1` and
`1.0`, `"1"` and `b"1"` all differ. Mapping keys are sorted by their encoding, so dict order does
not matter.
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NewType

ResultKey = NewType("ResultKey", str)
"""Hex digest naming one cached answer."""

DIGEST_BYTES = 32

# One byte tags each encoded value's type so values of different types never share bytes.
_NONE, _FALSE, _TRUE, _INT, _FLOAT, _STR, _BYTES, _LIST, _MAP = (bytes([c]) for c in b"NFTifsblm")


def canonical_bytes(value: object) -> bytes:
    """Encode `value` deterministically; raises TypeError for unsupported types.

    Supported: None, bool, int, float (NaN rejected, -0.0 folded into 0.0), str, bytes, and
    lists, tuples and mappings of these (tuples encode as lists, mapping keys must be str).
    """
    parts: list[bytes] = []
    _encode(value, parts)
    return b"".join(parts)


def _encode(value: object, out: list[bytes]) -> None:
    if value is None:
        out.append(_NONE)
    elif value is True:
        out.append(_TRUE)
    elif value is False:
        out.append(_FALSE)
    elif isinstance(value, int):
        text = str(value).encode()
        out.append(_INT + struct.pack(">I", len(text)) + text)
    elif isinstance(value, float):
        if math.isnan(value):
            raise TypeError("NaN has no canonical encoding")
        out.append(_FLOAT + struct.pack(">d", value + 0.0))  # + 0.0 turns -0.0 into 0.0
    elif isinstance(value, str):
        raw = value.encode("utf-8")
        out.append(_STR + struct.pack(">Q", len(raw)) + raw)
    elif isinstance(value, bytes | bytearray | memoryview):
        raw = bytes(value)
        out.append(_BYTES + struct.pack(">Q", len(raw)) + raw)
    elif isinstance(value, Mapping):
        items = []
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"mapping keys must be str, got {type(key).__name__}")
            items.append((canonical_bytes(key), canonical_bytes(item)))
        items.sort()
        out.append(_MAP + struct.pack(">Q", len(items)))
        for encoded_key, encoded_item in items:
            out.append(encoded_key)
            out.append(encoded_item)
    elif isinstance(value, Sequence):
        out.append(_LIST + struct.pack(">Q", len(value)))
        for item in value:
            _encode(item, out)
    else:
        raise TypeError(f"no canonical encoding for {type(value).__name__}")


@dataclass(frozen=True)
class RequestIdentity:
    """Everything that decides an answer, besides the input and parameters."""

    namespace: str
    tenant: str
    model_id: str
    model_version: str
    kind: str


def result_key(
    identity: RequestIdentity,
    request_input: object,
    params: Mapping[str, object],
    secret: bytes = b"",
) -> ResultKey:
    """The key of the answer to `request_input` with `params` under `identity`.

    `secret` keys the BLAKE2b digest (at most 64 bytes): with a cluster secret configured, keys
    cannot be predicted by anyone who lacks it.
    """
    encoded = canonical_bytes(
        [
            identity.namespace,
            identity.tenant,
            identity.model_id,
            identity.model_version,
            identity.kind,
            request_input,
            params,
        ]
    )
    digest = hashlib.blake2b(encoded, digest_size=DIGEST_BYTES, key=secret)
    return ResultKey(digest.hexdigest())


ROUTING_PREFIX_TOKENS = 256


def routing_key(
    namespace: str,
    tenant: str,
    model_id: str,
    tokens: Sequence[int],
    prefix_tokens: int = ROUTING_PREFIX_TOKENS,
) -> str:
    """The placement key of a prompt: its first `prefix_tokens` tokens, tenant and model.

    Prompts that share their beginning (a system prompt, a document) get the same key, so they
    meet the replica holding that prefix; the model version is left out so that placement
    does not move when weights are updated.
    """
    encoded = canonical_bytes([namespace, tenant, model_id, list(tokens[:prefix_tokens])])
    return hashlib.blake2b(encoded, digest_size=16).hexdigest()
