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

Keys are exact by default. `normalize_text` and `quantize_tensor` trade exactness for hit
ratio: a caller configured to apply them before keying makes requests that differ only in
what they normalize away share one key, and so one answer.
"""

from __future__ import annotations

import ctypes
import hashlib
import math
import re
import struct
import sys
import unicodedata
from array import array
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NewType

import torch

ResultKey = NewType("ResultKey", str)
"""Hex digest naming one cached answer."""

DIGEST_BYTES = 32

# One byte tags each encoded value's type so values of different types never share bytes.
_NONE, _FALSE, _TRUE, _INT, _FLOAT, _STR, _BYTES, _LIST, _MAP, _TENSOR = (
    bytes([c]) for c in b"NFTifsblmt"
)


def canonical_bytes(value: object) -> bytes:
    """Encode `value` deterministically; raises TypeError for unsupported types.

    Supported: None, bool, int, float (NaN rejected, -0.0 folded into 0.0), str, bytes, dense
    torch tensors, and lists, tuples and mappings of these (tuples encode as lists, mapping keys
    must be str). A tensor encodes as its dtype, shape and the bytes of its values in row-major
    order, wherever it lives and whatever its strides: equal values of another dtype or shape
    differ, and so do bit patterns that compare equal (-0.0 and 0.0, NaN payloads).
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
    elif isinstance(value, torch.Tensor):
        dtype = str(value.dtype).removeprefix("torch.")
        out.append(_TENSOR)
        _encode([dtype, list(value.shape), _tensor_bytes(value)], out)
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


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    if tensor.layout != torch.strided or tensor.is_meta:
        raise TypeError(f"no canonical encoding for a {tensor.layout} tensor without data")
    values = tensor.detach().resolve_conj().resolve_neg().cpu().contiguous()
    return ctypes.string_at(values.data_ptr(), values.numel() * values.element_size())


def token_ids_bytes(tokens: Sequence[int]) -> bytes:
    """Token ids as one run of little-endian signed 64-bit integers: a request input whose
    canonical form costs one C call, not one encoding per token (a 2,048-token prompt's key in
    tens of microseconds rather than a millisecond). Fixed width makes the bytes decide the
    ids and their count; raises OverflowError for an id outside int64, TypeError for a non-int.
    Callers use it for inputs that are token ids by their request's kind, so they never meet
    the same bytes given as another type."""
    packed = array("q", tokens)
    if sys.byteorder == "big":
        packed.byteswap()
    return packed.tobytes()


_WHITESPACE = re.compile(r"\s+")


def normalize_text(text: str) -> str:
    """`text` in Unicode NFC, with each run of whitespace one space and none at either end.

    Opt-in: prompts that differ only in Unicode composition or spacing then share a key.
    """
    return _WHITESPACE.sub(" ", unicodedata.normalize("NFC", text)).strip()


def quantize_tensor(tensor: torch.Tensor, step: float) -> torch.Tensor:
    """A floating `tensor` rounded to the nearest multiple of `step` (ties to even).

    Opt-in: inputs within `step / 2` of the same multiple then share a key. -0.0 becomes 0.0 and
    every NaN the same NaN; infinities stay, and so do finite values whose multiple would not be
    finite in the tensor's dtype. Other dtypes are returned unchanged. The rounding is done in
    float64, then cast back to the tensor's dtype. Put `step` in the request parameters, so that
    requests quantized with different steps never share a key.
    """
    if not (math.isfinite(step) and step > 0):
        raise ValueError(f"step must be a positive finite number, got {step!r}")
    if not tensor.is_floating_point():
        return tensor
    values = tensor.to(torch.float64)
    rounded = (torch.round(values / step) * step).to(tensor.dtype)
    rounded = torch.where(rounded.isinf() & values.isfinite(), tensor, rounded)
    rounded = torch.where(rounded == 0, torch.zeros_like(rounded), rounded)
    return torch.where(rounded.isnan(), torch.full_like(rounded, math.nan), rounded)


@dataclass(frozen=True)
class RequestIdentity:
    """Everything that decides an answer, besides the input and parameters."""

    namespace: str
    tenant: str
    model_id: str
    model_version: str
    kind: str
    model_generation: int = 0
    """The publication of `model_version` whose weights answer (`cluster.versions.records`): a label
    republished with other weights is a new generation, so its answers get other keys."""


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
            identity.model_generation,
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
