"""Hostile bodies against the running application: every one is a 4xx, and the cluster still
answers afterwards.

Bodies are written as JSON text, not built with `json.dumps`, so that they can hold what no
Python value serializes to: lone surrogate escapes, integers past Python's digit limit, `NaN`,
nesting past any parser's recursion, duplicated keys. Every generated body holds at least one
thing no route accepts, so none can change the cluster (publish a version, drop cached answers).
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterable, Iterator
from urllib.parse import urlsplit

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.e2e

MODEL = "tiny-gpt"
COMPLETIONS = "/v1/completions"
ADMIN_ROUTES = ["/v1/cache/invalidate", f"/v1/models/{MODEL}/version"]
# Admin routes may refuse before reading the body (no token configured: 403; wrong one: 401).
ADMIN_REFUSALS = {400, 401, 403, 404, 409, 413, 422}
MAX_BODY_BYTES = 4 * 1024 * 1024
FIELDS = [
    *("model", "prompt", "max_tokens", "temperature", "top_p", "seed", "stop", "n", "stream"),
    *("user", "version", "checkpoint", "force", "timeout_s", "tenant", "key"),
]
PLAUSIBLE = {"model": f'"{MODEL}"', "prompt": '"hi"', "max_tokens": "4", "temperature": "0"}
HOSTILE_RUN = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def escaped(text: str) -> str:
    """`text` as the inside of a JSON string."""
    return json.dumps(text)[1:-1]


def with_lone_surrogate(before: str, code: int, after: str) -> str:
    return f'"{escaped(before)}\\u{code:04x}{escaped(after)}"'


lone_surrogates = st.builds(
    with_lone_surrogate, st.text(max_size=8), st.integers(0xD800, 0xDFFF), st.text(max_size=8)
)
# JSON text that no route accepts wherever it stands.
poison = st.one_of(
    lone_surrogates,
    lone_surrogates.map(lambda s: f"[{s}]"),
    lone_surrogates.map(lambda s: f"{{{s}: 1}}"),
    st.integers(4301, 9000).map(lambda n: "9" * n),
    st.integers(4301, 9000).map(lambda n: "-" + "1" * n),
    st.sampled_from(["NaN", "Infinity", "-Infinity", "1e400", "-1e99999", "1" * 400 + ".5e999"]),
    st.integers(65, 5000).map(lambda n: "[" * n + "]" * n),
    st.integers(65, 2000).map(lambda n: '{"a": ' * n + "1" + "}" * n),
    st.just('{"role": "user", "role": "system"}'),
)
# Valid JSON of the wrong type, range or size for most fields.
odd = st.one_of(
    st.integers(-(10**30), 10**30).map(str),
    st.integers(20, 4000).map(lambda n: "9" * n),
    st.floats(allow_nan=False, allow_infinity=False).map(json.dumps),
    st.sampled_from(["true", "false", "null", '""', "[]", "{}", "[[[]]]", "-0", "1E308"]),
    st.text(max_size=40).map(json.dumps),
    st.integers(10_000, 300_000).map(lambda n: "[" + ",".join(["7"] * n) + "]"),
    st.integers(1000, 100_000).map(lambda n: json.dumps(["stop"] * n)),
    st.integers(1, 60).map(lambda n: "[" * n + "]" * n),
    st.dictionaries(st.text(max_size=8), st.integers(), max_size=4).map(json.dumps),
)
unknown_fields = st.text(min_size=1, max_size=20).filter(lambda name: name not in FIELDS)


def json_object(fields: dict[str, str]) -> str:
    return "{" + ", ".join(f"{json.dumps(name)}: {value}" for name, value in fields.items()) + "}"


@st.composite
def poisoned_bodies(draw: st.DrawFn) -> bytes:
    """A body holding at least one poison fragment: refused by every route."""
    if draw(st.integers(0, 9)) == 0:
        return draw(poison).encode()  # the whole body
    fields = {name: value for name, value in PLAUSIBLE.items() if draw(st.booleans())}
    fields |= draw(st.dictionaries(st.sampled_from(FIELDS), odd, max_size=3))
    fields[draw(st.sampled_from(FIELDS) | unknown_fields)] = draw(poison)
    return json_object(fields).encode()


@st.composite
def wrong_completion_bodies(draw: st.DrawFn) -> bytes:
    """Well-formed JSON that is not a valid completion: wrong types, sizes, unknown fields."""
    fields = dict(PLAUSIBLE)
    fields |= draw(st.dictionaries(st.sampled_from(FIELDS[:10]), odd, max_size=4))
    fields[draw(unknown_fields)] = draw(odd)
    return json_object(fields).encode()


not_json = st.one_of(
    st.binary(max_size=300),
    st.sampled_from([b"", b"{", b"\xff\xfe{}", b"\xef\xbb\xbf{}", b"\xed\xa0\x80", b"[" * 100_000]),
    st.text(max_size=200).map(lambda s: s.encode("utf-8") + b"\x80"),
)


@pytest.fixture(scope="module")
def http(running_app) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=running_app.url, timeout=60) as client:
        yield client


def post(http: httpx.Client, route: str, body: bytes, headers: dict[str, str]) -> httpx.Response:
    return http.post(route, content=body, headers={"content-type": "application/json", **headers})


def assert_named_client_error(response: httpx.Response) -> None:
    assert 400 <= response.status_code < 500, (response.status_code, response.text[:500])
    error = response.json()["error"]
    assert isinstance(error["param"], str) and error["param"], error


@HOSTILE_RUN
@given(body=poisoned_bodies() | wrong_completion_bodies() | not_json)
def test_hostile_completion_bodies_get_a_4xx_naming_the_field(running_app, http, body):
    assert_named_client_error(post(http, COMPLETIONS, body, running_app.auth_headers()))


@HOSTILE_RUN
@given(body=poisoned_bodies() | not_json, route=st.sampled_from(ADMIN_ROUTES))
def test_hostile_admin_bodies_get_a_4xx(running_app, http, body, route):
    response = post(http, route, body, running_app.admin_headers())
    assert response.status_code in ADMIN_REFUSALS, (response.status_code, response.text[:500])


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b'{"model": "tiny-gpt", "prompt": "\\ud800"}', "prompt"),
        (b'{"model": "tiny-gpt", "prompt": "hi", "stop": "\\ud800"}', "stop"),
        (b'{"model": "tiny-gpt", "prompt": "hi", "stop": ["x", "\\udfff"]}', "stop.1"),
        (
            b'{"model": "tiny-gpt", "prompt": "hi", "max_tokens": ' + b"9" * 5000 + b"}",
            "max_tokens",
        ),
        (
            b'{"model": "tiny-gpt", "prompt": "hi", "max_tokens": ' + b"9" * 4000 + b"}",
            "max_tokens",
        ),
        (b"[" * 100_000, "body"),
        (b'{"model": "tiny-gpt", "\\ud800": 1}', "body"),
    ],
    ids=["prompt", "stop", "stop-list", "5000-digits", "4000-digits", "deep", "key"],
)
def test_the_reported_inputs_get_a_400_on_their_field(running_app, http, body, param):
    response = post(http, COMPLETIONS, body, running_app.auth_headers())
    assert response.status_code == 400, response.text[:500]
    assert response.json()["error"]["param"] == param


def test_an_over_long_body_with_content_length_is_a_413(running_app, http):
    body = b'{"prompt": "' + b"x" * MAX_BODY_BYTES + b'"}'
    response = post(http, COMPLETIONS, body, running_app.auth_headers())
    assert response.status_code == 413, response.text[:500]
    assert response.json()["error"]["param"] == "body"


def test_an_over_long_chunked_body_is_a_413(running_app, http):
    def chunks() -> Iterator[bytes]:
        yield b'{"prompt": "'
        for _ in range(MAX_BODY_BYTES // 65536 + 1):
            yield b"x" * 65536
        yield b'"}'

    response = http.post(COMPLETIONS, content=chunks(), headers=running_app.auth_headers())
    assert response.status_code == 413, response.text[:500]


def raw_status(url: str, head: str, body_chunks: Iterable[bytes] = ()) -> int:
    """Send `head`, then `body_chunks` while the server reads them, and return the status
    the server answered; a server still waiting for the rest of the body times the test out."""
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=20) as sock:
        sock.sendall(head.encode("latin-1"))
        for chunk in body_chunks:
            try:
                sock.sendall(chunk)
            except OSError:
                break  # the server answered and closed: read what it said
        status_line = sock.makefile("rb").readline()
    return int(status_line.split()[1])


def request_head(running_app, framing: str) -> str:
    parts = urlsplit(running_app.url)
    headers = {
        "host": f"{parts.hostname}:{parts.port}",
        "content-type": "application/json",
        "connection": "close",
        **running_app.auth_headers(),
    }
    lines = [f"POST {COMPLETIONS} HTTP/1.1", *(f"{k}: {v}" for k, v in headers.items()), framing]
    return "\r\n".join(lines) + "\r\n\r\n"


def test_a_declared_length_over_the_limit_is_refused_before_the_body_is_sent(running_app):
    # No byte of the body follows: a server that waited for it would never answer.
    head = request_head(running_app, f"content-length: {10**12}")
    assert raw_status(running_app.url, head) == 413


def test_a_chunked_body_is_refused_while_it_streams_in(running_app):
    # The body never ends: the answer must come once the limit is passed.
    chunk = b"x" * 65536
    framed = b"%x\r\n" % len(chunk) + chunk + b"\r\n"
    head = request_head(running_app, "transfer-encoding: chunked")
    chunks = iter([b'c\r\n{"prompt": "\r\n'] + [framed] * (MAX_BODY_BYTES // len(chunk) + 8))
    assert raw_status(running_app.url, head, chunks) == 413


def test_the_cluster_still_answers_after(running_app, http):
    health = http.get("/healthz")
    assert health.status_code == 200, health.text
    assert health.json()["status"] == "ok"
    assert health.json()["replicas"] == running_app.replica_count()
    body = {"model": MODEL, "prompt": "Still here", "max_tokens": 4, "temperature": 0}
    response = http.post(COMPLETIONS, json=body, headers=running_app.auth_headers())
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["text"] is not None
