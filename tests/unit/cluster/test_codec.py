"""The envelope codec: bit-exact round trips, each rejection by name, and hostile bytes.

`forge` writes envelopes from the layout drawn in `cluster/codec.py`'s docstring, independently
of `encode`: it checks that the docstring is true, and it builds envelopes with a valid MAC
around any header at all, as a replica with a bug (or a stolen secret) could.
"""

import hashlib
import math
import struct
import time
import tracemalloc
from typing import Any

import msgpack
import pytest
import torch
from cryptography.hazmat.primitives.poly1305 import Poly1305
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from cluster import codec
from cluster.codec import (
    DTYPES,
    MAGIC,
    MAX_HEADER_BYTES,
    MAX_ITEMS,
    MAX_NDIM,
    CodecError,
    Envelope,
)
from cluster.secret import ClusterSecret

SECRET = ClusterSecret(b"the codec tests' cluster secret")
OTHER = ClusterSecret(b"another cluster's secret entirely")
FIXED = struct.Struct("<4sB3sIQ8s16s")  # magic, version, reserved, H, P, key id, nonce
HEADER_AT = FIXED.size  # 44
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def encode(*args: Any, **kwargs: Any) -> bytes:
    """`codec.encode`, signed under SECRET unless told otherwise."""
    return codec.encode(*args, **{"secret": SECRET, **kwargs})


def decode(data: Any, **kwargs: Any) -> Envelope:
    """`codec.decode` by a reader holding SECRET unless told otherwise."""
    return codec.decode(data, **{"secret": SECRET, **kwargs})


def bits(tensor: torch.Tensor) -> bytes:
    """The bytes of a tensor's values in row-major order: equal bits, not equal values."""
    return bytes(tensor.contiguous().reshape(-1).view(torch.uint8).tolist())


def tensor_from_bytes(raw: bytes, dtype: torch.dtype, shape: list[int]) -> torch.Tensor:
    values = torch.tensor(list(raw), dtype=torch.uint8).view(dtype).reshape(shape)
    if dtype == torch.bool:  # only 0 and 1 are bools
        values = values.view(torch.uint8).bitwise_and(1).view(torch.bool)
    return values


def canonical_header(
    specs: list[tuple[str, str, list[int]]], blob_len: int = 0, **fields: object
) -> dict[str, object]:
    """A header as `encode` writes it for tensors `(name, dtype, shape)` and a blob."""
    tensors, end = [], 0
    for name, dtype, shape in specs:
        offset = end + (-end % 16)
        length = math.prod(shape) * DTYPES[dtype].itemsize
        tensors.append([name, dtype, shape, offset, length])
        end = offset + length
    header = {
        "kind": "kv",
        "model": "m",
        "version": "1",
        "created_at": 1.0,
        "tensors": tensors,
        "blob": [end, blob_len],
        "meta": {},
    }
    header.update(fields)
    return header


def forge(
    header: object = None,
    payload: bytes = b"",
    *,
    packed: bytes | None = None,
    secret: ClusterSecret = SECRET,
    key_id: bytes | None = None,
    nonce: bytes = bytes(range(16)),
    reserved: bytes = bytes(3),
    magic: bytes = MAGIC,
    format_version: int = 2,
) -> bytes:
    """An envelope laid out as the module docstring draws it, signed under `secret` (and naming
    `key_id`, by default the secret's own)."""
    if packed is None:
        packed = msgpack.packb(header)
    key_id = secret.key_id if key_id is None else key_id
    fixed = FIXED.pack(magic, format_version, reserved, len(packed), len(payload), key_id, nonce)
    one_time_key = hashlib.blake2b(nonce, key=secret.values, digest_size=32).digest()
    mac = Poly1305.generate_tag(one_time_key, fixed + packed + payload)
    padding = bytes(-(len(fixed) + len(packed) + len(mac)) % 16)
    return fixed + packed + mac + padding + payload


def reason_of(data: bytes | bytearray | memoryview, **kwargs: object) -> str:
    with pytest.raises(CodecError) as info:
        decode(data, **kwargs)
    return info.value.reason


def assert_same(envelope: Envelope, tensors: dict[str, torch.Tensor], **fields: object) -> None:
    for field, value in fields.items():
        assert getattr(envelope, field) == value, field
    assert list(envelope.tensors) == list(tensors)
    for name, tensor in tensors.items():
        decoded = envelope.tensors[name]
        assert decoded.device.type == "cpu"
        assert (decoded.dtype, decoded.shape) == (tensor.dtype, tensor.shape), name
        assert bits(decoded) == bits(tensor), name


def sample_tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "k": torch.randn(4, 16, 64, generator=generator),
        "v": torch.randn(4, 16, 64, generator=generator).to(torch.bfloat16),
        "mask": torch.rand(7, generator=generator) > 0.5,
        "step": torch.tensor(3, dtype=torch.int64),
        "empty": torch.empty(0, 5, dtype=torch.float16),
    }


def sample_envelope(secret: ClusterSecret = SECRET) -> bytes:
    return encode(
        "kv",
        "tiny-gpt",
        "7",
        created_at=1_700_000_000.25,
        tensors=sample_tensors(),
        blob=b"\x93\x01\x02\x03",
        meta={"tokens": 16, "layers": [0, 1, 2, 3], "tenant": "a"},
        secret=secret,
    )


# Round trips


@pytest.mark.parametrize("secret", [SECRET, OTHER])
def test_round_trip(secret):
    envelope = decode(sample_envelope(secret), secret=secret, expect_kind="kv")
    assert_same(
        envelope,
        sample_tensors(),
        kind="kv",
        model="tiny-gpt",
        version="7",
        created_at=1_700_000_000.25,
        blob=b"\x93\x01\x02\x03",
        meta={"tokens": 16, "layers": [0, 1, 2, 3], "tenant": "a"},
    )


@pytest.mark.parametrize("dtype_name", sorted(DTYPES))
def test_every_dtype_round_trips(dtype_name):
    dtype = DTYPES[dtype_name]
    tensor = tensor_from_bytes(bytes(range(256))[: 12 * dtype.itemsize], dtype, [3, 4])
    envelope = decode(encode("t", "m", "1", created_at=0.0, tensors={"x": tensor}))
    assert_same(envelope, {"x": tensor})


@pytest.mark.parametrize(
    ("dtype", "patterns"),
    [
        (torch.float32, [0x7FC00000, 0x7FC00001, -0x00400000, 0x7F800001, -0x80000000, 1]),
        (torch.float64, [0x7FF8000000000001, -0x0008000000000000, -(2**63), 0x7FF0000000000001]),
        (torch.float16, [0x7E01, -0x0200, 0x7C01, -0x8000, 0x0001]),
        (torch.bfloat16, [0x7FC1, -0x0040, 0x7F81, -0x8000, 0x0001]),
    ],
)
def test_nan_payloads_negative_zero_and_subnormals_survive_bit_for_bit(dtype, patterns):
    int_dtype = {2: torch.int16, 4: torch.int32, 8: torch.int64}[dtype.itemsize]
    tensor = torch.tensor(patterns, dtype=int_dtype).view(dtype)
    decoded = decode(encode("t", "m", "1", created_at=0.0, tensors={"x": tensor})).tensors["x"]
    assert decoded.view(int_dtype).tolist() == patterns


def test_strided_and_autograd_tensors_are_written_as_their_values():
    base = torch.arange(60, dtype=torch.float32).reshape(3, 4, 5)
    tensors = {
        "transposed": base.transpose(0, 2),
        "sliced": base[1:, ::2, 1],
        "expanded": torch.arange(3.0).expand(4, 3),
        "grad": torch.ones(2, 2, requires_grad=True) * 2,
        "negated": torch._neg_view(torch.arange(3.0)),  # its memory holds 0, 1, 2
    }
    decoded = decode(encode("t", "m", "1", created_at=0.0, tensors=tensors)).tensors
    for name, tensor in tensors.items():
        assert decoded[name].is_contiguous()
        assert torch.equal(decoded[name], tensor.detach()), name
        assert not decoded[name].requires_grad


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensors_come_back_on_the_cpu():
    tensor = torch.randn(8, 8, device="cuda").to(torch.bfloat16)
    decoded = decode(encode("t", "m", "1", created_at=0.0, tensors={"x": tensor})).tensors["x"]
    assert decoded.device.type == "cpu" and bits(decoded) == bits(tensor.cpu())


def test_blob_only_and_empty_envelopes():
    envelope = decode(encode("answer", "m", "v2", created_at=5, blob=bytearray(b"text")))
    assert (envelope.tensors, envelope.blob, envelope.meta, envelope.created_at) == (
        {},
        b"text",
        {},
        5.0,
    )
    assert decode(encode("", "", "", created_at=0.0)).blob == b""


def test_every_encoding_draws_a_new_nonce():
    first, second = sample_envelope(), sample_envelope()
    assert first[28:44] != second[28:44] and first != second
    assert bits(decode(first).tensors["k"]) == bits(decode(second).tensors["k"])


def test_layout_is_the_documented_one():
    data = sample_envelope()
    assert data[:4] == MAGIC and data[4] == 2 and data[5:8] == bytes(3)
    header_len, payload_len = struct.unpack_from("<IQ", data, 8)
    assert data[20:28] == SECRET.key_id
    header = msgpack.unpackb(data[HEADER_AT : HEADER_AT + header_len])
    assert (len(data) - payload_len) % 16 == 0
    payload = data[len(data) - payload_len :]
    assert data == forge(header, payload, nonce=data[28:44])
    theirs = sample_envelope(OTHER)
    assert forge(header, payload, secret=OTHER, nonce=theirs[28:44]) == theirs
    tensors = sample_tensors()
    for name, dtype, shape, offset, length in header["tensors"]:
        assert offset % 16 == 0
        assert (dtype, shape) == (
            codec._DTYPE_NAMES[tensors[name].dtype],
            list(tensors[name].shape),
        )
        assert payload[offset : offset + length] == bits(tensors[name])
    blob_offset, blob_len = header["blob"]
    assert payload[blob_offset:] == b"\x93\x01\x02\x03" and blob_len == 4


names = st.text(max_size=6)
metas = st.dictionaries(
    st.text(max_size=6),
    st.recursive(
        st.none()
        | st.booleans()
        | st.integers(-(2**63), 2**64 - 1)
        | st.text(max_size=8)
        # NaN never equals itself, so the property below compares finite floats only.
        | st.floats(allow_nan=False)
        | st.binary(max_size=8),
        lambda children: (
            st.lists(children, max_size=3)
            | st.dictionaries(st.text(max_size=4), children, max_size=3)
        ),
        max_leaves=8,
    ),
    max_size=4,
)


@st.composite
def tensors_strategy(draw):
    result = {}
    for name in draw(st.lists(names, max_size=4, unique=True)):
        dtype = DTYPES[draw(st.sampled_from(sorted(DTYPES)))]
        shape = draw(st.lists(st.integers(0, 4), max_size=3))  # [] is a scalar
        size = math.prod(shape) * dtype.itemsize
        result[name] = tensor_from_bytes(
            draw(st.binary(min_size=size, max_size=size)), dtype, shape
        )
    return result


@settings(max_examples=150, deadline=None)
@given(
    tensors_strategy(),
    st.binary(max_size=64),
    metas,
    st.binary(min_size=16, max_size=40).map(ClusterSecret),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=8),
    st.booleans(),
)
def test_round_trip_property(tensors, blob, meta, secret, created_at, version, writable):
    data = encode(
        "kv", "m", version, created_at=created_at, tensors=tensors, blob=blob, meta=meta,
        secret=secret,
    )  # fmt: skip
    source = bytearray(data) if writable else data
    envelope = decode(source, secret=secret, expect_kind="kv")
    assert_same(envelope, tensors, version=version, created_at=created_at, blob=blob, meta=meta)


# Memory ownership


def test_tensors_decoded_from_bytes_are_private_and_writable():
    data = sample_envelope()
    first = decode(data).tensors["k"]
    first.add_(1)  # no warning (warnings are errors here), and no effect on the bytes
    assert torch.equal(decode(data).tensors["k"], sample_tensors()["k"])


def test_tensors_decoded_from_a_bytearray_share_it_and_pin_its_size():
    buffer = bytearray(sample_envelope())
    envelope = decode(buffer)
    k = envelope.tensors["k"]
    address = k.data_ptr()
    assert torch.equal(k, sample_tensors()["k"])
    with pytest.raises(BufferError):
        buffer.extend(bytes(1 << 20))  # would move the memory under the tensors
    del envelope, k
    buffer.extend(b"x")  # the tensors are gone: the buffer is the caller's again
    assert address


def test_an_unaligned_writable_buffer_still_decodes():
    shifted = bytearray(b"\x00" + sample_envelope())
    decoded = decode(memoryview(shifted)[1:]).tensors
    assert decoded["k"].data_ptr() % 4 == 0
    assert torch.equal(decoded["k"], sample_tensors()["k"])
    assert torch.equal(decoded["step"], sample_tensors()["step"])


# Each rejection, by name


def test_too_large():
    data = sample_envelope()
    assert reason_of(data, max_bytes=len(data) - 1) == "too_large"
    assert decode(data, max_bytes=len(data)).kind == "kv"


@pytest.mark.parametrize("keep", [0, 3, 19, 27, 43, 44, 60, -1])
def test_truncated(keep):
    data = sample_envelope()
    assert reason_of(data[:keep]) == "truncated"


def test_wrong_magic():
    assert reason_of(forge(canonical_header([]), magic=b"PK\x03\x04")) == "magic"
    assert reason_of(b"\x80\x04\x95" + bytes(60)) == "magic"  # a pickle is not an envelope


@pytest.mark.parametrize("format_version", [0, 1, 3, 255])
def test_unknown_format_version(format_version):
    assert reason_of(forge(canonical_header([]), format_version=format_version)) == "format_version"


def test_framing():
    header = canonical_header([("x", "float32", [3])])
    payload = bytes(12)
    assert reason_of(forge(header, payload, reserved=b"\x00\x01\x00")) == "framing"
    assert reason_of(forge(header, payload, reserved=b"\x80\x00\x00")) == "framing"
    assert reason_of(forge(header, payload) + b"\x00") == "framing"
    data = bytearray(forge(header, payload))
    padding_at = HEADER_AT + len(msgpack.packb(header)) + 16
    assert padding_at % 16, "this header must leave padding before the payload"
    data[padding_at] = 1
    assert reason_of(bytes(data)) == "framing"


@pytest.mark.parametrize("where", ["nonce", "header", "mac", "tensor", "gap", "blob"])
def test_a_changed_byte_fails_the_mac(where):
    data = bytearray(sample_envelope())
    header_len, payload_len = struct.unpack_from("<IQ", data, 8)
    payload_start = len(data) - payload_len
    header = msgpack.unpackb(data[HEADER_AT : HEADER_AT + header_len])
    mask = next(entry for entry in header["tensors"])
    position = {
        "nonce": 30,
        "header": HEADER_AT + header_len // 2,
        "mac": HEADER_AT + header_len + 3,
        "tensor": payload_start + 100,
        "gap": payload_start + mask[3] + mask[4],  # alignment zeros between two tensors
        "blob": len(data) - 1,
    }[where]
    data[position] ^= 0x01
    assert reason_of(bytes(data)) == "hmac"


def test_a_value_signed_under_another_secret_is_foreign_not_forged():
    theirs = sample_envelope(OTHER)
    assert reason_of(theirs) == "foreign_secret"
    assert decode(theirs, secret=OTHER).model == "tiny-gpt"
    # Naming our key id does not make their MAC ours: that is a forgery.
    relabelled = theirs[:20] + SECRET.key_id + theirs[28:]
    assert reason_of(relabelled) == "hmac"
    # And our value relabelled with their key id is foreign to us (not deleted, never served).
    assert reason_of(sample_envelope()[:20] + OTHER.key_id + sample_envelope()[28:]) == (
        "foreign_secret"
    )


def test_a_forger_without_the_secret_cannot_sign():
    signed = sample_envelope()
    header_len = struct.unpack_from("<I", signed, 8)[0]
    header = msgpack.unpackb(signed[HEADER_AT : HEADER_AT + header_len])
    payload = signed[len(signed) - struct.unpack_from("<Q", signed, 12)[0] :]
    guess = ClusterSecret(b"a guess at the cluster secret")
    assert reason_of(forge(header, payload, secret=guess, key_id=SECRET.key_id)) == "hmac"
    assert decode(forge(header, payload)).model == "tiny-gpt"


def test_format_1_envelopes_are_no_longer_read():
    packed = msgpack.packb(canonical_header([]))
    # Format 1: the 20-byte fixed header, the msgpack header, an xxh3 checksum, padding.
    old = struct.pack("<4sBBHIQ", MAGIC, 1, 0, 0, len(packed), 0) + packed + bytes(8)
    old += bytes(-len(old) % 16)
    assert reason_of(old) == "format_version"


HOSTILE_HEADERS = {
    "not a map": [1, 2, 3],
    "missing key": {k: v for k, v in canonical_header([]).items() if k != "meta"},
    "extra key": canonical_header([], extra=1),
    "kind not str": canonical_header([], kind=1),
    "version not str": canonical_header([], version=b"1"),
    "created_at str": canonical_header([], created_at="now"),
    "created_at bool": canonical_header([], created_at=True),
    "created_at nan": canonical_header([], created_at=math.nan),
    "created_at inf": canonical_header([], created_at=-math.inf),
    "meta list": canonical_header([], meta=[1]),
    "meta bytes key": canonical_header([], meta={b"k": 1}),
    "blob not pair": canonical_header([], blob=[0]),
    "blob negative": canonical_header([], blob=[0, -1]),
    "blob bool": canonical_header([], blob=[False, 0]),
    "tensors map": canonical_header([], tensors={"x": 1}),
    "tensor arity": canonical_header([], tensors=[["x", "float32", [1], 0]]),
    "tensor name int": canonical_header([], tensors=[[1, "float32", [1], 0, 4]], blob=[4, 0]),
    "shape not list": canonical_header([], tensors=[["x", "float32", 1, 0, 4]], blob=[4, 0]),
    "shape negative": canonical_header([], tensors=[["x", "float32", [-1], 0, 4]], blob=[4, 0]),
    "shape float": canonical_header([], tensors=[["x", "float32", [1.0], 0, 4]], blob=[4, 0]),
    "shape bool": canonical_header([], tensors=[["x", "float32", [True], 0, 4]], blob=[4, 0]),
    "too many dims": canonical_header([("x", "uint8", [1] * (MAX_NDIM + 1))], 0),
    "offset negative": canonical_header([], tensors=[["x", "uint8", [1], -1, 1]], blob=[1, 0]),
    "duplicate names": canonical_header([("x", "uint8", [1]), ("x", "uint8", [1])]),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_HEADERS))
def test_header_of_wrong_structure_or_types(case):
    header = HOSTILE_HEADERS[case]
    assert reason_of(forge(header, bytes(64))) == "header", case


@pytest.mark.parametrize(
    "packed",
    [
        b"",
        b"\xc1",  # never used in msgpack
        b"\x81\xa4kind",  # truncated map
        msgpack.packb(canonical_header([])) + b"\x00",  # extra data after the header
        b"\xdd\xff\xff\xff\xff",  # an array that claims 4 billion elements
        b"\xdf\xff\xff\xff\xff",  # a map that claims 4 billion entries
        b"\xdb\xff\xff\xff\xff" + b"x" * 8,  # a str that claims 4 GiB
        b"\xc6\xff\xff\xff\xff",  # a bin that claims 4 GiB
        b"\x91" * 100_000,  # nested 100,000 deep
        b"\x81\xa1k\xa2\xff\xfe",  # invalid UTF-8
        b"\x81\xa1k\xd4\x01\x00",  # an extension type
        b"\x81\xa1k\xd6\xff\x00\x00\x00\x00",  # a timestamp extension
        b"\x81\x01\x02",  # an int map key
        msgpack.packb(list(range(MAX_ITEMS + 1))),
    ],
    ids=lambda packed: packed[:12].hex() or "empty",
)
def test_malformed_msgpack_header(packed):
    assert reason_of(forge(packed=packed)) == "header"


def test_header_over_its_size_limit():
    fixed = FIXED.pack(MAGIC, 2, bytes(3), MAX_HEADER_BYTES + 1, 0, SECRET.key_id, bytes(16))
    assert reason_of(fixed + bytes(MAX_HEADER_BYTES + 32)) == "header"


@pytest.mark.parametrize("dtype", ["complex64", "float8_e4m3fn", "object", "torch.float32", ""])
def test_unknown_dtype(dtype):
    header = canonical_header([], tensors=[["x", dtype, [2], 0, 8]], blob=[8, 0])
    assert reason_of(forge(header, bytes(8))) == "dtype"


@pytest.mark.parametrize(
    ("tensors", "blob", "payload_len"),
    [
        ([["x", "float32", [3], 0, 8]], [8, 0], 8),  # shape says 12 bytes
        ([["x", "float32", [2], 0, 8]], [8, 0], 16),  # payload longer than the parts
        ([["x", "float32", [2], 8, 8]], [16, 0], 16),  # offset not canonical
        ([["x", "uint8", [4], 0, 4], ["y", "uint8", [4], 0, 4]], [4, 0], 4),  # overlapping
        ([["x", "uint8", [4], 0, 4], ["y", "uint8", [4], 4, 4]], [8, 0], 8),  # misaligned
        ([["x", "uint8", [4], 0, 4]], [2, 2], 4),  # blob inside a tensor
        ([["x", "uint8", [4], 0, 4]], [4, 4], 4),  # blob past the payload
        ([["x", "float32", [2**40, 2**40], 0, 16]], [16, 0], 16),  # product far beyond length
        ([["x", "float32", [0, 2**62, 2**62], 0, 0]], [0, 0], 0),  # empty, absurd strides
        ([["x", "int64", [2**60], 0, 2**63]], [2**63, 0], 0),  # length beyond the payload
    ],
)
def test_layout_that_disagrees(tensors, blob, payload_len):
    header = canonical_header([], tensors=tensors, blob=blob)
    assert reason_of(forge(header, bytes(payload_len))) == "layout"


def test_bool_bytes_other_than_zero_and_one():
    header = canonical_header([("mask", "bool", [3])])
    assert decode(forge(header, b"\x00\x01\x01")).tensors["mask"].tolist() == [False, True, True]
    assert reason_of(forge(header, b"\x00\x02\x01")) == "layout"


def test_expect_kind():
    assert reason_of(sample_envelope(), expect_kind="answer") == "kind"
    assert decode(sample_envelope(), expect_kind=None).kind == "kv"


def test_codec_error_is_a_value_error():
    with pytest.raises(ValueError, match="hmac"):
        decode(sample_envelope()[:-1] + b"\x00")


@pytest.mark.parametrize(
    "arguments",
    [
        {"tensors": {"x": torch.zeros(2, dtype=torch.complex64)}},
        {"tensors": {"x": torch.zeros(2, dtype=torch.uint16)}},
        {"tensors": {"x": torch.eye(2).to_sparse()}},
        {"tensors": {"x": torch.empty(2, device="meta")}},
        {"tensors": {1: torch.zeros(2)}},
        {"tensors": {"x": [1.0, 2.0]}},
        {"tensors": {"x": torch.zeros([1] * (MAX_NDIM + 1))}},
        {"meta": {"x": object()}},
        {"meta": {"x": {1: "int key"}}},
        {"meta": {"x": 2**64}},
        {"meta": {"x": "\ud800"}},
        {"meta": {"x": list(range(MAX_ITEMS + 1))}},
        {"meta": {"x": b"x" * MAX_HEADER_BYTES}},
        {"created_at": math.nan},
        {"created_at": "yesterday"},
        {"kind": None},
    ],
    ids=lambda arguments: repr(arguments)[:40],
)
def test_unencodable(arguments):
    call = {"kind": "kv", "created_at": 0.0, **arguments}
    with pytest.raises(CodecError) as info:
        encode(call.pop("kind"), "m", "1", **call)
    assert info.value.reason == "unencodable"


# Hostile bytes: CodecError or the exact original, nothing else, and bounded memory


def test_huge_declared_lengths_are_rejected_without_allocating():
    cases = [
        FIXED.pack(MAGIC, 2, bytes(3), 2**32 - 1, 2**64 - 1, SECRET.key_id, bytes(16)) + bytes(8),
        FIXED.pack(MAGIC, 2, bytes(3), 16, 2**63, SECRET.key_id, bytes(16)) + bytes(64),
        forge(packed=b"\xdd\xff\xff\xff\xff"),
        forge(packed=b"\xc6\x7f\xff\xff\xff"),
        forge(canonical_header([], tensors=[["x", "uint8", [2**62], 0, 2**62]], blob=[2**62, 0])),
        forge(canonical_header([], tensors=[["x", "uint8", [2**31] * 32, 0, 0]], blob=[0, 0])),
    ]
    tracemalloc.start()
    started = time.perf_counter()
    try:
        for data in cases:
            with pytest.raises(CodecError):
                decode(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - started < 1.0
    assert peak < 256 * 1024


@FUZZ
@given(st.binary(max_size=300))
def test_random_bytes(data):
    try:
        decode(data)
    except CodecError as exc:
        event(exc.reason)


@FUZZ
@given(
    st.sampled_from([bytes(3), b"\x01\x00\x00"]),
    st.integers(0, 2**32 - 1) | st.integers(0, 64),
    st.integers(0, 2**64 - 1) | st.integers(0, 256),
    st.sampled_from([SECRET.key_id, OTHER.key_id]),
    st.binary(max_size=300),
)
def test_random_bytes_behind_a_plausible_fixed_header(
    reserved, header_len, payload_len, key_id, rest
):
    data = FIXED.pack(MAGIC, 2, reserved, header_len, payload_len, key_id, bytes(16)) + rest
    try:
        decode(data)
    except CodecError as exc:
        event(exc.reason)


msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=10)
    | st.binary(max_size=10),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=25,
)


def any_int(draw: st.DrawFn, around: int) -> int:
    """An int near `around`, or anywhere msgpack can encode one."""
    low, high = -(2**63), 2**64 - 1
    near = st.integers(max(around - 16, low), min(around + 16, high))
    return draw(near | st.integers(low, high))


@st.composite
def forged_envelopes(draw: st.DrawFn) -> tuple[dict, bytes]:
    """A canonical header and payload, then a few changes an attacker might make to them."""
    specs = draw(
        st.lists(
            st.tuples(
                st.text(max_size=2),
                st.sampled_from(sorted(DTYPES)),
                st.lists(st.integers(0, 3), max_size=3),
            ),
            max_size=3,
            unique_by=lambda spec: spec[0],
        )
    )
    blob_len = draw(st.integers(0, 8))
    header = canonical_header(specs, blob_len, meta=draw(metas))
    payload = draw(st.binary(min_size=header["blob"][0] + blob_len, max_size=300))
    payload = payload[: header["blob"][0] + blob_len] if draw(st.booleans()) else payload
    for _ in range(draw(st.integers(0, 3))):
        tensors, blob = header["tensors"], header["blob"]
        change = draw(st.sampled_from(["field", "dtype", "dim", "offset", "length", "blob"]))
        if change == "field":
            header[draw(st.sampled_from(sorted(header)))] = draw(msgpack_values)
        elif change == "blob" and isinstance(blob, list) and blob:
            index = draw(st.integers(0, len(blob) - 1))
            blob[index] = any_int(draw, blob[index] if isinstance(blob[index], int) else 0)
        elif isinstance(tensors, list) and tensors:
            entry = tensors[draw(st.integers(0, len(tensors) - 1))]
            if not (isinstance(entry, list) and len(entry) == 5):
                continue  # replaced by a "field" change
            if change == "dtype":
                entry[1] = draw(st.sampled_from([*DTYPES, "complex64", "float8_e5m2"]))
            elif change == "dim" and isinstance(entry[2], list) and entry[2]:
                entry[2][draw(st.integers(0, len(entry[2]) - 1))] = any_int(draw, 2)
            elif change in ("offset", "length"):
                index = 3 if change == "offset" else 4
                # A "field" change may have put anything there, not only an int.
                around = entry[index] if isinstance(entry[index], int) else 0
                entry[index] = any_int(draw, around)
    return header, payload


@FUZZ
@given(forged_envelopes())
def test_forged_headers_with_valid_macs(forged):
    """What a replica with a bug, or an attacker holding the secret, could write: decoding
    still raises nothing but CodecError and returns only what the bytes hold."""
    header, payload = forged
    try:
        envelope = decode(forge(header, payload))
    except CodecError as exc:
        event(exc.reason)
        return
    event("decoded")
    assert envelope.blob == payload[header["blob"][0] :]
    for name, dtype, shape, offset, length in header["tensors"]:
        tensor = envelope.tensors[name]
        assert (tensor.dtype, list(tensor.shape)) == (DTYPES[dtype], shape)
        assert bits(tensor) == payload[offset : offset + length]


@FUZZ
@given(msgpack_values | st.binary(max_size=100).map(lambda raw: ("raw", raw)))
def test_any_header_object(header):
    packed = header[1] if isinstance(header, tuple) else msgpack.packb(header)
    try:
        decode(forge(packed=packed, payload=b"\x00" * 8))
    except CodecError as exc:
        event(exc.reason)


VALID = sample_envelope()

mutations = st.one_of(
    st.tuples(st.just("flip"), st.lists(st.tuples(st.integers(0), st.integers(0, 7)), max_size=4)),
    st.tuples(st.just("truncate"), st.integers(0)),
    st.tuples(st.just("extend"), st.binary(min_size=1, max_size=40)),
    st.tuples(st.just("splice"), st.tuples(st.integers(0), st.integers(0, 64), st.binary())),
    st.tuples(st.just("swap"), st.tuples(st.integers(0), st.integers(0), st.integers(1, 32))),
)


def mutate(data: bytes, mutation: tuple) -> bytes:
    what, how = mutation
    out = bytearray(data)
    if what == "flip":
        for position, bit in how:
            out[position % len(out)] ^= 1 << bit
    elif what == "truncate":
        del out[how % len(out) :]
    elif what == "extend":
        out += how
    elif what == "splice":
        start, length, replacement = how
        start %= len(out)
        out[start : start + length] = replacement
    else:  # swap two ranges: every byte is still somewhere
        first, second, length = (how[0] % len(out), how[1] % len(out), how[2])
        a, b = bytes(out[first : first + length]), bytes(out[second : second + length])
        out[second : second + len(b)] = a[: len(b)] + b[len(a) :]
        out[first : first + len(a)] = b[: len(a)] + a[len(b) :]
    return bytes(out)


@FUZZ
@given(mutations, st.booleans())
def test_mutated_envelopes_fail_unless_unchanged(mutation, writable):
    original = VALID
    data = mutate(original, mutation)
    try:
        envelope = decode(bytearray(data) if writable else data)
    except CodecError as exc:
        event(exc.reason)
        assert data != original
        return
    event("decoded")
    assert data == original, "a changed envelope decoded"
    assert_same(
        envelope, sample_tensors(), meta={"tokens": 16, "layers": [0, 1, 2, 3], "tenant": "a"}
    )
