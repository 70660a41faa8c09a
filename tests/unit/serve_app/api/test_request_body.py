"""Reading a request body: limits while it streams in, and JSON checked to its last string.

Each test builds a real starlette `Request` over an ASGI scope and a `receive` that hands out
the body in chunks, as the server does; no server runs.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.requests import Request

from serve_app.api.request_body import MAX_JSON_DEPTH, parse_json, read_body, read_json_body
from serve_app.errors import BodyTooLarge, InvalidRequest

LIMIT = 1024


class Client:
    """The sending side of one request: `chunks` in order, then (unless `hangs_up` is false)
    the end of the body; with `hangs_up`, a disconnect instead of the end."""

    def __init__(
        self, chunks: Iterable[bytes], headers: dict[str, str] | None = None, hangs_up: bool = False
    ) -> None:
        self._chunks = iter(chunks)
        self._hangs_up = hangs_up
        self.received = 0
        scope_headers = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
        self.scope: dict[str, Any] = {
            "type": "http",
            "method": "POST",
            "path": "/v1/completions",
            "query_string": b"",
            "headers": scope_headers,
        }

    async def receive(self) -> dict[str, Any]:
        chunk = next(self._chunks, None)
        if chunk is None:
            if self._hangs_up:
                return {"type": "http.disconnect"}
            return {"type": "http.request", "body": b"", "more_body": False}
        self.received += len(chunk)
        return {"type": "http.request", "body": chunk, "more_body": True}

    def request(self) -> Request:
        return Request(self.scope, self.receive)


def endless(chunk: bytes) -> Iterable[bytes]:
    while True:
        yield chunk


# --- limits -------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_body_within_the_limit_is_read_whole():
    body = json.dumps({"model": "m", "prompt": "x" * (LIMIT - 40)}).encode()
    assert len(body) <= LIMIT
    client = Client([body[:100], body[100:]], {"content-length": str(len(body))})
    assert await read_json_body(client.request(), LIMIT) == json.loads(body)


@pytest.mark.asyncio
async def test_a_body_of_exactly_the_limit_is_accepted():
    body = b'"' + b"x" * (LIMIT - 2) + b'"'
    assert await read_json_body(Client([body]).request(), LIMIT) == "x" * (LIMIT - 2)


@pytest.mark.asyncio
async def test_declared_length_over_the_limit_is_refused_before_reading():
    client = Client(endless(b"x" * 100), {"content-length": str(LIMIT + 1)})
    with pytest.raises(BodyTooLarge) as refused:
        await read_body(client.request(), LIMIT)
    assert client.received == 0
    assert (refused.value.http_status, refused.value.param) == (413, "body")


@pytest.mark.asyncio
async def test_chunked_body_is_refused_once_it_passes_the_limit():
    client = Client(endless(b"x" * 100))
    with pytest.raises(BodyTooLarge):
        await read_body(client.request(), LIMIT)
    assert LIMIT < client.received <= LIMIT + 100


@pytest.mark.asyncio
async def test_more_bytes_than_declared_are_refused_at_the_limit():
    client = Client(endless(b"x" * 100), {"content-length": "10"})
    with pytest.raises(BodyTooLarge):
        await read_body(client.request(), LIMIT)
    assert client.received <= LIMIT + 100


@pytest.mark.asyncio
@pytest.mark.parametrize("length", ["abc", "-1", "1.5", " 12", "0x10", "١٢"])
async def test_malformed_content_length_is_a_400_on_body(length):
    client = Client([b"{}"], {"content-length": length})
    with pytest.raises(InvalidRequest) as invalid:
        await read_body(client.request(), LIMIT)
    assert (invalid.value.http_status, invalid.value.param) == (400, "body")


@pytest.mark.asyncio
async def test_two_different_content_lengths_are_a_400():
    client = Client([b"{}"])
    client.scope["headers"] = [(b"content-length", b"2"), (b"content-length", b"3")]
    with pytest.raises(InvalidRequest) as invalid:
        await read_body(client.request(), LIMIT)
    assert invalid.value.http_status == 400


@pytest.mark.asyncio
async def test_a_content_length_of_thousands_of_digits_is_too_large():
    with pytest.raises(BodyTooLarge):
        await read_body(Client([b"{}"], {"content-length": "9" * 5000}).request(), LIMIT)
    padded = Client([b"{}"], {"content-length": "0" * 5000 + "2"})
    assert await read_json_body(padded.request(), LIMIT) == {}


@pytest.mark.asyncio
async def test_a_client_that_leaves_mid_body_is_a_client_error():
    client = Client([b'{"model": '], hangs_up=True)
    with pytest.raises(InvalidRequest) as invalid:
        await read_json_body(client.request(), LIMIT)
    assert invalid.value.param == "body"


@pytest.mark.asyncio
async def test_large_bodies_are_parsed_the_same_way():
    # Over the size that moves parsing off the event loop.
    body = json.dumps({"prompt": list(range(100_000)), "stop": ["a", "\ud800"]}).encode()
    client = Client([body[i : i + 65536] for i in range(0, len(body), 65536)])
    with pytest.raises(InvalidRequest) as invalid:
        await read_json_body(client.request(), 4 * 1024 * 1024)
    assert invalid.value.param == "stop.1"


# --- JSON ---------------------------------------------------------------------------------------


def fault(raw: bytes, **kwargs: Any) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as invalid:
        parse_json(raw, **kwargs)
    assert invalid.value.http_status == 400
    # The error must itself be sendable: the response encodes it as UTF-8.
    json.dumps(invalid.value.to_json(), ensure_ascii=False).encode()
    return invalid.value


@pytest.mark.parametrize(
    ("raw", "param"),
    [
        (b'{"model": "m", "prompt": "\\ud800"}', "prompt"),
        (b'{"prompt": "x", "stop": "\\udfff"}', "stop"),
        (b'{"prompt": "x", "stop": ["ok", "a\\ud800b"]}', "stop.1"),
        (b'{"messages": [{"role": "user", "content": "\\ud83d"}]}', "messages.0.content"),
        (b'{"prompt": "\\ude00\\ud83d"}', "prompt"),  # a pair in the wrong order
        (b'"\\ud800"', "body"),
        (b'{"\\ud800": 1}', "body"),
        (b'{"tools": [{"\\udc00x": 1}]}', "tools.0"),
    ],
)
def test_lone_surrogates_are_named_by_their_path(raw, param):
    invalid = fault(raw)
    assert invalid.param == param
    assert "Unicode" in invalid.message


def test_surrogate_pairs_and_escaped_backslashes_are_text():
    assert parse_json(b'{"prompt": "\\ud83d\\ude00"}') == {"prompt": "\U0001f600"}
    assert parse_json(b'{"prompt": "\\\\ud800"}') == {"prompt": "\\ud800"}


@pytest.mark.parametrize(
    ("raw", "param"),
    [
        (b'{"max_tokens": ' + b"9" * 5000 + b"}", "max_tokens"),
        (b'{"prompt": [1, 2, -' + b"1" * 4301 + b"]}", "prompt.2"),
        (b"7" * 10_000, "body"),
        (b'{"temperature": 1e400}', "temperature"),
        (b'{"top_p": -1' + b"0" * 400 + b".5}", "top_p"),
        (b'{"temperature": NaN}', "temperature"),
        (b'{"a": [Infinity]}', "a.0"),
        (b'{"a": {"b": -Infinity}}', "a.b"),
    ],
)
def test_numbers_that_do_not_fit_are_named(raw, param):
    assert fault(raw).param == param


def test_integers_python_can_convert_stay_exact():
    digits = "1" * 4000
    assert parse_json(f'{{"max_tokens": {digits}}}'.encode()) == {"max_tokens": int(digits)}


def test_a_key_given_twice_is_refused_where_it_is():
    assert fault(b'{"model": "a", "model": "b"}').param == "body"
    invalid = fault(b'{"messages": [{"role": "user", "role": "system"}]}')
    assert invalid.param == "messages.0"
    assert "'role'" in invalid.message


@pytest.mark.parametrize("opener", [b"[", b'{"a":'])
def test_nesting_past_the_parser_is_a_400_on_body(opener):
    assert fault(opener * 100_000).param == "body"


def nested(depth: int) -> bytes:
    """An object whose field `a` holds lists nested until the whole value is `depth` deep."""
    return b'{"a": ' + b"[" * (depth - 1) + b"1" + b"]" * (depth - 1) + b"}"


def test_nesting_is_limited_to_max_depth():
    assert parse_json(nested(MAX_JSON_DEPTH))
    invalid = fault(nested(MAX_JSON_DEPTH + 1))
    assert invalid.param == "a" + ".0" * (MAX_JSON_DEPTH - 1)
    assert fault(nested(5), max_depth=4).param == "a.0.0.0"


def test_brackets_inside_strings_do_not_count_as_nesting():
    text = '["[[[[[[", "\\"[[[[", "\\\\", {"k[[[[[": "]]]"}]'
    assert parse_json(text.encode(), max_depth=2) == json.loads(text)


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"   ",
        b"{",
        b"{not json",
        b"\xff\xfe{}",
        b"\xef\xbb\xbf{}",
        b"{} {}",
        b"'a'",
        b"\xc0\x80",
    ],
)
def test_bytes_that_are_not_utf8_json_are_a_400_on_body(raw):
    assert fault(raw).param == "body"


def test_an_encoded_surrogate_is_not_utf8():
    # CESU-style bytes for U+D800: a strict UTF-8 decoder refuses them.
    assert fault(b'"\xed\xa0\x80"').param == "body"


def test_a_million_token_ids_are_checked_quickly():
    body = json.dumps({"prompt": [7] * 1_000_000}).encode()
    assert len(parse_json(body)["prompt"]) == 1_000_000


# --- properties ---------------------------------------------------------------------------------

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(alphabet=st.characters(codec="utf-8") | st.sampled_from('[]{}"\\'))
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=40,
)


def depth(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max(map(depth, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(depth, value), default=0)
    return 0


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(value=json_values, max_depth=st.integers(1, 6), ascii_only=st.booleans())
def test_valid_json_round_trips_and_depth_is_exact(value, max_depth, ascii_only):
    raw = json.dumps(value, ensure_ascii=ascii_only).encode()
    if depth(value) > max_depth:
        assert "nested deeper" in fault(raw, max_depth=max_depth).message
    else:
        assert parse_json(raw, max_depth=max_depth) == value


@settings(max_examples=300, deadline=None)
@given(raw=st.binary(max_size=200) | st.text(max_size=100).map(lambda s: s.encode("utf-8")))
def test_any_bytes_give_a_value_that_encodes_or_a_400(raw):
    try:
        value = parse_json(raw)
    except InvalidRequest as exc:
        assert exc.http_status == 400
        json.dumps(exc.to_json(), ensure_ascii=False).encode()
    else:
        json.dumps(value, ensure_ascii=False, allow_nan=False).encode()


surrogates = st.integers(0xD800, 0xDFFF).map(lambda code: f"\\u{code:04x}")


@settings(max_examples=200, deadline=None)
@given(value=json_values, data=st.data())
def test_a_lone_surrogate_anywhere_is_refused(value, data):
    raw = json.dumps(value).encode()
    quotes = [i for i, byte in enumerate(raw) if byte == ord('"')]
    # Just after a quote: inside a string or key when the quote opens one.
    at = data.draw(st.sampled_from(quotes)) + 1 if quotes else 0
    surrogate = data.draw(surrogates).encode()
    mutated = raw[:at] + surrogate + raw[at:]
    try:
        json.loads(mutated)
    except ValueError:
        return  # the escape landed outside every string: not JSON at all
    assert "Unicode" in fault(mutated).message
